//! `train`'s generic adapter flags (`--targets`, `--rank`, `--alpha`, `--dropout`,
//! `--opt key=value`) turned into a method's config through the registry: the method's
//! [`CliSpec`] says which JSON keys the flags set, its defaults and its options; the JSON built
//! from them is then read like any `adapter_config.json` (`AdapterConfig::from_json`, which
//! validates it). No method is named here.

use std::collections::BTreeMap;

use candle_peft::adapter::{CliSpec, Method, OptionKind, OptionSpec};
use candle_peft::adapters::METHODS;
use candle_peft::{AdapterConfig, PeftError};
use serde_json::{Map, Value, json};

/// The config `train --method <method>` builds from its flags. Unknown `--opt` keys, `--alpha`
/// for a method without one, a non-zero `--dropout` for a method without one, and options given
/// together with the flag or option they exclude are refused, naming them.
pub fn adapter_config(
    method: Method,
    targets: &[String],
    rank: Option<usize>,
    alpha: Option<f64>,
    dropout: Option<f64>,
    opts: &[(String, String)],
) -> anyhow::Result<AdapterConfig> {
    let cli = &method.spec().cli;
    // Later repeats of a key win; keys are handled in sorted order.
    let opts: BTreeMap<&str, &str> = opts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut options = Vec::with_capacity(opts.len());
    for (&key, &value) in &opts {
        let Some(spec) = cli.options.iter().find(|o| o.key == key) else {
            let known: Vec<&str> = cli.options.iter().map(|o| o.key).collect();
            return Err(invalid(
                format!("--opt {key}"),
                format!(
                    "`{key}` is not an option of {method} (its options: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
            .into());
        };
        options.push((spec, value));
    }
    if cli.dropout.is_none() && dropout.is_some_and(|p| p != 0.0) {
        return Err(invalid("--dropout", format!("{method} has no dropout")).into());
    }
    if cli.alpha.is_none() && alpha.is_some() {
        return Err(invalid("--alpha", format!("{method} has no alpha")).into());
    }
    if cli.rank.is_none() && rank.is_some() {
        return Err(invalid("--rank", format!("{method} has no rank")).into());
    }

    let mut json = defaults(method, cli)?;
    json.insert("peft_type".into(), json!(method.peft_type()));
    // `--targets all-linear` is PEFT's string shorthand, not a module name.
    let target_modules = match targets {
        [one] if one.eq_ignore_ascii_case(candle_peft::config::ALL_LINEAR) => json!(one),
        _ => json!(targets),
    };
    json.insert("target_modules".into(), target_modules);
    if let (Some(key), Some(r)) = (cli.rank, rank) {
        json.insert(key.into(), json!(r));
    }
    if let Some(key) = cli.alpha {
        match (alpha, cli.alpha_per_rank) {
            (Some(a), _) => {
                json.insert(key.into(), json!(a));
            }
            (None, Some(per_rank)) => {
                let r = cli
                    .rank
                    .and_then(|k| json.get(k))
                    .and_then(Value::as_u64)
                    .ok_or_else(|| anyhow::anyhow!("{method}: α per rank needs a default rank"))?;
                json.insert(key.into(), json!(f64::from(per_rank) * r as f64));
            }
            (None, None) => {}
        }
    }
    if let (Some(key), Some(p)) = (cli.dropout, dropout) {
        json.insert(key.into(), json!(p));
    }
    for &(spec, value) in &options {
        check_exclusion(spec, rank, &opts)?;
        set_path(&mut json, spec.path, parse_value(spec, value)?);
    }
    Ok(AdapterConfig::from_json(&Value::Object(json))?)
}

/// The library's config error (same text as the library's own).
fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PeftError {
    PeftError::InvalidConfig {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Every method with its summary and options, for `--method`'s help.
pub fn methods_help() -> String {
    let mut out = String::new();
    for m in METHODS {
        let spec = m.spec();
        out.push_str(&format!("{}: {}\n", spec.name, spec.summary));
        for o in spec.cli.options {
            out.push_str(&format!("    --opt {}=…  {}\n", o.key, o.help));
        }
    }
    out
}

/// The method's CLI defaults as a JSON object.
fn defaults(method: Method, cli: &CliSpec) -> anyhow::Result<Map<String, Value>> {
    match serde_json::from_str(cli.defaults) {
        Ok(Value::Object(map)) => Ok(map),
        _ => anyhow::bail!("{method}: the registry's CLI defaults are not a JSON object"),
    }
}

/// Refuses `spec` when what it excludes (`--rank`, or another option) was given too.
fn check_exclusion(
    spec: &OptionSpec,
    rank: Option<usize>,
    opts: &BTreeMap<&str, &str>,
) -> anyhow::Result<()> {
    let Some(other) = spec.excludes else {
        return Ok(());
    };
    let clash = match other {
        "--rank" => rank.is_some(),
        key => opts.contains_key(key),
    };
    if clash {
        let other = if other.starts_with("--") {
            other.to_string()
        } else {
            format!("--opt {other}")
        };
        return Err(invalid(
            format!("--opt {}", spec.key),
            format!("give either {other} or --opt {}, not both", spec.key),
        )
        .into());
    }
    Ok(())
}

/// `value` as the JSON value of an option of kind `spec.kind`.
fn parse_value(spec: &OptionSpec, value: &str) -> anyhow::Result<Value> {
    let bad = || {
        invalid(
            format!("--opt {}", spec.key),
            format!("cannot parse `{value}`"),
        )
    };
    Ok(match spec.kind {
        OptionKind::Bool => json!(value.parse::<bool>().map_err(|_| bad())?),
        OptionKind::Int => match value.parse::<i64>() {
            Ok(v) => json!(v),
            Err(_) => json!(value.parse::<u64>().map_err(|_| bad())?),
        },
        OptionKind::Float => json!(value.parse::<f64>().map_err(|_| bad())?),
        OptionKind::Str => json!(value),
        OptionKind::BoolOrStr => match value {
            "true" => json!(true),
            "false" => json!(false),
            other => json!(other),
        },
        OptionKind::IntList => {
            let list = value
                .split(',')
                .map(|s| s.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    invalid(
                        format!("--opt {}", spec.key),
                        format!("`{value}` is not a comma-separated list of integers"),
                    )
                })?;
            json!(list)
        }
    })
}

/// Sets `path` (dot-separated keys) in `json`, creating objects on the way.
fn set_path(json: &mut Map<String, Value>, path: &str, value: Value) {
    let mut keys: Vec<&str> = path.split('.').collect();
    let last = keys.pop().unwrap_or(path);
    let mut map = json;
    for key in keys {
        let entry = map
            .entry(key.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(inner) = entry else {
            unreachable!("just made an object")
        };
        map = inner;
    }
    map.insert(last.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_peft::adapters::{corda, eva, flora, lora, randlora, salt, svfit};
    use candle_peft::config::OneOrMany;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn build(m: Method, rank: Option<usize>, o: &[(&str, &str)]) -> anyhow::Result<AdapterConfig> {
        adapter_config(m, &["q".to_string()], rank, None, None, &opts(o))
    }

    #[test]
    fn lora_defaults_match_the_old_cli() {
        let c = build(lora::METHOD, None, &[]).unwrap();
        let mut want = lora::LoraConfig::new(&["q"], 8, 16.0);
        want.lora_dropout = 0.0;
        assert_eq!(c, AdapterConfig::Lora(want));
    }

    #[test]
    fn eva_sets_its_section() {
        let c = build(
            eva::METHOD,
            Some(4),
            &[("tau", "0.5"), ("use_rslora", "true")],
        )
        .unwrap();
        let AdapterConfig::Lora(c) = c else { panic!() };
        assert_eq!(c.r, 4);
        assert!(c.use_rslora);
        assert_eq!(c.eva_config.unwrap().tau, 0.5);
    }

    #[test]
    fn flora_rank_lists_and_exclusions() {
        let AdapterConfig::Flora(c) = build(flora::METHOD, None, &[("r", "16,16,2,2")]).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.r, OneOrMany::Many(vec![16, 16, 2, 2]));
        assert!(build(flora::METHOD, None, &[("r", "16,x")]).is_err());
        assert!(build(flora::METHOD, Some(4), &[("r", "4,4")]).is_err());
        let e = build(flora::METHOD, None, &[("use_rslora", "true")]).unwrap_err();
        assert!(
            e.to_string().contains("its options: r, init_weights"),
            "{e}"
        );
    }

    #[test]
    fn randlora_alpha_follows_rank() {
        let AdapterConfig::RandLora(c) = build(randlora::METHOD, Some(4), &[]).unwrap() else {
            panic!()
        };
        assert_eq!((c.r, c.randlora_alpha), (4, 80.0));
        assert!(build(randlora::METHOD, None, &[("use_rslora", "true")]).is_err());
    }

    #[test]
    fn refusals() {
        assert!(build(svfit::METHOD, Some(2), &[("energy", "0.9")]).is_err());
        assert!(build(salt::METHOD, None, &[("r_t", "2"), ("ratio_salt", "0.2")]).is_err());
        let e =
            adapter_config(svfit::METHOD, &["q".into()], None, Some(1.0), None, &[]).unwrap_err();
        assert!(e.to_string().contains("svfit has no alpha"), "{e}");
        let AdapterConfig::Corda(c) =
            build(corda::METHOD, None, &[("corda_method", "kpm")]).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.corda_method, corda::CordaMethod::Kpm);
    }
}
