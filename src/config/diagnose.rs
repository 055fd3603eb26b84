//! The errors of a targeting that selects nothing: which field is at fault, what the model's
//! layers are called (their distinct last segments, not every path), and the closest name to a
//! mistyped entry.

use std::collections::BTreeSet;

use crate::error::PeftError;

/// Why nothing was selected, gathered by `Targeting::select`.
pub(crate) struct NoTarget<'a> {
    /// `target_modules`, rendered for display.
    pub targets: String,
    /// The `target_modules` list entries (empty for a regex or `"all-linear"`).
    pub entries: Vec<&'a str>,
    /// Every candidate module path.
    pub names: Vec<&'a str>,
    /// Modules `target_modules` matched that `layers_to_transform` left out, with their layer
    /// index (if any).
    pub other_layer: Vec<(&'a str, Option<usize>)>,
    /// Modules `target_modules` matched that `exclude_modules` removed.
    pub excluded: Vec<&'a str>,
    /// Modules `target_modules` matched that `modules_to_save` covers.
    pub saved: Vec<&'a str>,
    /// `layers_to_transform`.
    pub layers: Vec<usize>,
    /// `layers_pattern`, when set.
    pub layers_pattern: Option<String>,
}

/// The error naming the field that made the selection empty.
pub(crate) fn no_target(why: NoTarget<'_>) -> PeftError {
    if let Some(&first) = why.excluded.first().or(why.saved.first()) {
        let (field, count) = if why.excluded.is_empty() {
            ("modules_to_save", why.saved.len())
        } else {
            ("exclude_modules", why.excluded.len() + why.saved.len())
        };
        return PeftError::config(
            field,
            format!(
                "removes every module target_modules {} matches ({count}, such as `{first}`)",
                why.targets
            ),
        );
    }
    if let Some(&(first, _)) = why.other_layer.first() {
        let found: BTreeSet<usize> = why.other_layer.iter().filter_map(|(_, i)| *i).collect();
        if found.is_empty() {
            return match &why.layers_pattern {
                Some(p) => PeftError::config(
                    "layers_pattern",
                    format!(
                        "{p} finds no layer index in the modules target_modules {} matches \
                         (such as `{first}`)",
                        why.targets
                    ),
                ),
                None => PeftError::config(
                    "layers_to_transform",
                    format!(
                        "the modules target_modules {} matches have no layer index (such as \
                         `{first}`)",
                        why.targets
                    ),
                ),
            };
        }
        let missing: Vec<String> = why
            .layers
            .iter()
            .filter(|l| !found.contains(l))
            .map(|l| l.to_string())
            .collect();
        let found: Vec<String> = found.iter().map(|l| l.to_string()).collect();
        let index = if missing.len() == 1 {
            "index"
        } else {
            "indices"
        };
        return PeftError::config(
            "layers_to_transform",
            format!(
                "no layer has {index} {}: the modules target_modules {} matches are in layers {}",
                missing.join(", "),
                why.targets,
                found.join(", ")
            ),
        );
    }
    PeftError::NoTargetMatch {
        targets: why.targets,
        found: describe_layers(&why.names, &why.entries),
    }
}

/// The distinct last segments of `names` (in first-seen order), how many paths they come from
/// with one example, and, for each of `wanted` that is close to a name, the suggestion.
pub(crate) fn describe_layers(names: &[&str], wanted: &[&str]) -> String {
    let mut seen = BTreeSet::new();
    let mut last = Vec::new();
    for n in names {
        let seg = n.rsplit('.').next().unwrap_or(n);
        if seen.insert(seg) {
            last.push(seg);
        }
    }
    let Some(first) = names.first() else {
        return "(the model has no adaptable layer)".to_string();
    };
    let mut out = format!(
        "{} (the last segments of {} layer paths such as `{first}`)",
        last.join(", "),
        names.len()
    );
    for w in wanted {
        if let Some(s) = closest(w, names) {
            out.push_str(&format!("; did you mean `{s}` for `{w}`?"));
        }
    }
    out
}

/// The suffix of `names` (with as many segments as `wanted`) closest to `wanted` by edit
/// distance, if it is close: at most a third of `wanted`'s length, and at least one, apart.
/// `None` when `wanted` already matches a name.
fn closest(wanted: &str, names: &[&str]) -> Option<String> {
    let segments = wanted.split('.').count();
    let mut suffixes = BTreeSet::new();
    for n in names {
        let parts: Vec<&str> = n.split('.').collect();
        if parts.len() >= segments {
            suffixes.insert(parts[parts.len() - segments..].join("."));
        }
    }
    if suffixes.contains(wanted) {
        return None;
    }
    let limit = (wanted.chars().count() / 3).max(1);
    suffixes
        .into_iter()
        .map(|s| (edit_distance(wanted, &s), s))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, s)| s)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_the_closest_suffix() {
        let names = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.mlp.up_proj",
        ];
        assert_eq!(closest("q_prj", &names).as_deref(), Some("q_proj"));
        assert_eq!(
            closest("self_atn.k_proj", &names).as_deref(),
            Some("self_attn.k_proj")
        );
        assert_eq!(closest("lm_head", &names), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let text = describe_layers(&names, &["q_prj"]);
        assert_eq!(
            text,
            "q_proj, k_proj, up_proj (the last segments of 3 layer paths such as \
             `model.layers.0.self_attn.q_proj`); did you mean `q_proj` for `q_prj`?"
        );
    }
}
