//! Every method's config is built the same way: `Default` plus struct update, from the crate
//! root's re-exports alone; it validates, round-trips through `adapter_config.json`, and its
//! `Default` is what a file with only `peft_type` and targets reads as.

use candle_peft::{
    AdapterConfig, CordaConfig, CordaMethod, EvaConfig, FloraConfig, InitLoraWeights, LolduConfig,
    LoraConfig, ModuleSelector, OneOrMany, PeftError, Precision, RandLoraConfig, SaltConfig,
    SvfitConfig, Targeting,
};
use serde_json::json;

fn targets(names: &[&str]) -> Targeting {
    Targeting::new(ModuleSelector::list(names))
}

/// One config of every method, each built with struct update over `Default`.
fn configs() -> Vec<AdapterConfig> {
    vec![
        LoraConfig {
            targeting: targets(&["q_proj", "v_proj"]),
            r: 16,
            lora_alpha: 32.0,
            use_rslora: true,
            init_lora_weights: InitLoraWeights::Named("gaussian".into()),
            ..Default::default()
        }
        .into(),
        // EVA writes LoRA's config with its `eva_config` section.
        LoraConfig {
            targeting: targets(&["q_proj"]),
            init_lora_weights: InitLoraWeights::Named("eva".into()),
            eva_config: Some(EvaConfig {
                rho: 1.5,
                ..Default::default()
            }),
            ..Default::default()
        }
        .into(),
        CordaConfig {
            lora: LoraConfig {
                targeting: targets(&["q_proj"]),
                r: 4,
                lora_alpha: 8.0,
                ..CordaConfig::default().lora
            },
            corda_method: CordaMethod::Kpm,
            ..Default::default()
        }
        .into(),
        SvfitConfig {
            targeting: targets(&["dense"]),
            r: Some(4),
            svd_dtype: Precision::F32,
            ..Default::default()
        }
        .into(),
        LolduConfig {
            targeting: targets(&["dense"]),
            r: 4,
            lora_alpha: 2.0,
            ..Default::default()
        }
        .into(),
        RandLoraConfig {
            targeting: Targeting {
                layers_to_transform: Some(OneOrMany::Many(vec![0, 2])),
                ..targets(&["query"])
            },
            r: 8,
            randlora_alpha: 160.0,
            sparse: true,
            ..Default::default()
        }
        .into(),
        FloraConfig {
            targeting: targets(&["conv"]),
            r: OneOrMany::Many(vec![4, 4, 2, 2]),
            scale: 2.0,
            ..Default::default()
        }
        .into(),
        SaltConfig {
            targeting: targets(&["query", "value"]),
            r_t: Some(4),
            r_lora: 16,
            reg_weight: 0.01,
            ..Default::default()
        }
        .into(),
    ]
}

#[test]
fn every_method_config_builds_from_default_with_struct_update() {
    let configs = configs();
    let peft_types: Vec<String> = configs
        .iter()
        .map(|c| c.method().peft_type().to_string())
        .collect();
    assert_eq!(
        peft_types,
        [
            "LORA", "LORA", "CORDA", "SVFIT", "LOLDU", "RANDLORA", "FLORA", "SALT"
        ]
    );
    for config in configs {
        config.validate().unwrap();
        let json = config.to_json().unwrap();
        let back = AdapterConfig::from_json(&json).unwrap();
        assert_eq!(back, config, "{json}");
        assert_eq!(back.to_json().unwrap(), json);
    }
}

#[test]
fn default_is_what_a_file_with_only_targets_reads_as() {
    let read = |peft_type: &str| {
        AdapterConfig::from_json(&json!({"peft_type": peft_type, "target_modules": ["q"]})).unwrap()
    };
    let q = || targets(&["q"]);
    let lora = LoraConfig {
        targeting: q(),
        ..Default::default()
    };
    assert_eq!(read("LORA"), lora.clone().into());
    assert_eq!((lora.r, lora.lora_alpha), (8, 8.0));
    assert_eq!(
        read("CORDA"),
        CordaConfig {
            lora: LoraConfig {
                targeting: q(),
                ..CordaConfig::default().lora
            },
            ..Default::default()
        }
        .into()
    );
    let svfit = SvfitConfig {
        targeting: q(),
        ..Default::default()
    };
    assert_eq!((svfit.r, svfit.energy), (None, 0.99));
    assert_eq!(read("SVFIT"), svfit.into());
    let loldu = LolduConfig {
        targeting: q(),
        ..Default::default()
    };
    assert_eq!((loldu.r, loldu.lora_alpha), (8, 1.0));
    assert_eq!(read("LOLDU"), loldu.into());
    let randlora = RandLoraConfig {
        targeting: q(),
        ..Default::default()
    };
    assert_eq!((randlora.r, randlora.randlora_alpha), (32, 640.0));
    assert_eq!(read("RANDLORA"), randlora.into());
    let flora = FloraConfig {
        targeting: q(),
        ..Default::default()
    };
    assert_eq!((flora.r.clone(), flora.scale), (OneOrMany::One(8), 1.0));
    assert_eq!(read("FLORA"), flora.into());
    let salt = SaltConfig {
        targeting: q(),
        ..Default::default()
    };
    assert_eq!(
        (salt.r_t, salt.ratio_salt, salt.r_lora, salt.store_factors),
        (None, 0.1, 8, true)
    );
    assert_eq!(read("SALT"), salt.into());
}

#[test]
fn default_without_targets_fails_validation_naming_target_modules() {
    let defaults: Vec<AdapterConfig> = vec![
        LoraConfig::default().into(),
        CordaConfig::default().into(),
        SvfitConfig::default().into(),
        LolduConfig::default().into(),
        RandLoraConfig::default().into(),
        FloraConfig::default().into(),
        SaltConfig::default().into(),
    ];
    for config in defaults {
        match config.validate() {
            Err(PeftError::InvalidConfig { field, .. }) => assert_eq!(field, "target_modules"),
            other => panic!("{}: expected InvalidConfig, got {other:?}", config.method()),
        }
    }
}

#[test]
fn constructors_agree_with_struct_update() {
    let q = || targets(&["q"]);
    assert_eq!(
        LoraConfig::new(&["q"], 4, 8.0),
        LoraConfig {
            targeting: q(),
            r: 4,
            lora_alpha: 8.0,
            ..Default::default()
        }
    );
    assert_eq!(
        SaltConfig::new(&["q"], 4),
        SaltConfig {
            targeting: q(),
            r_lora: 4,
            ..Default::default()
        }
    );
    assert_eq!(
        RandLoraConfig::new(&["q"], 4, 80.0),
        RandLoraConfig {
            targeting: q(),
            r: 4,
            randlora_alpha: 80.0,
            ..Default::default()
        }
    );
    assert_eq!(
        FloraConfig::new(&["q"], OneOrMany::One(4), 2.0),
        FloraConfig {
            targeting: q(),
            r: OneOrMany::One(4),
            scale: 2.0,
            ..Default::default()
        }
    );
    assert_eq!(
        SvfitConfig::with_rank(&["q"], 3),
        SvfitConfig {
            targeting: q(),
            r: Some(3),
            ..Default::default()
        }
    );
    assert_eq!(
        LolduConfig::new(&["q"], 3),
        LolduConfig {
            targeting: q(),
            r: 3,
            ..Default::default()
        }
    );
    let corda = CordaConfig::new(&["q"], 4, 8.0);
    assert_eq!(
        corda,
        CordaConfig {
            lora: LoraConfig {
                targeting: q(),
                r: 4,
                lora_alpha: 8.0,
                ..CordaConfig::default().lora
            },
            ..Default::default()
        }
    );
    assert_eq!(corda.corda_method, CordaMethod::Ipm);
}
