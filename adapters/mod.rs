//! The method registry. One file per method, each the whole method: its registry entry
//! (`METHOD`, a [`MethodSpec`](crate::adapter::MethodSpec)), config, init, forward, delta and
//! file I/O. Method files import only the core layers (`adapter`, `config`, `error`, `init`,
//! `linalg`, the kernels), never this file.
//!
//! Adding a method: a new file here that declares `pub const METHOD: Method` and its config
//! (implementing [`MethodConfig`]), and one line in the `registry!` list below.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;

use crate::adapter::{Adapter, LayerGeometry, Method};
use crate::config::{InitContext, LoadContext, MethodConfig, Targeting};
use crate::error::{PeftError, Result};

pub(crate) mod factored;
pub(crate) mod support;

/// Declares the method modules, the [`AdapterConfig`] enum over the config types (one variant
/// per method with a file format of its own), its dispatch and `From` impls, and [`METHODS`].
/// A line is `module;` for a method that writes another method's config (EVA writes LoRA's), or
/// `module => Variant(module::ConfigType);`.
macro_rules! registry {
    ($($module:ident $(=> $variant:ident($config:ty))?;)*) => {
        $(pub mod $module;)*

        /// The config of one adapter, for any method with a file format of its own.
        #[derive(Clone, Debug, PartialEq)]
        pub enum AdapterConfig {
            $($(
                #[doc = concat!("`", stringify!($config), "`.")]
                $variant($config),
            )?)*
        }

        impl AdapterConfig {
            /// The method's own config, behind the common interface.
            pub fn inner(&self) -> &dyn MethodConfig {
                match self {
                    $($(AdapterConfig::$variant(c) => c,)?)*
                }
            }

            /// The method's own config, behind the common interface, to change.
            pub fn inner_mut(&mut self) -> &mut dyn MethodConfig {
                match self {
                    $($(AdapterConfig::$variant(c) => c,)?)*
                }
            }

            /// The config of the method whose `peft_type` is `peft_type`, if one has its own.
            fn parse(peft_type: &str, value: &serde_json::Value) -> Result<Option<Self>> {
                $($(
                    if peft_type == $module::METHOD.peft_type() {
                        return Ok(Some(AdapterConfig::$variant(
                            <$config>::from_peft_json(value)?,
                        )));
                    }
                )?)*
                Ok(None)
            }
        }

        $($(
            impl From<$config> for AdapterConfig {
                fn from(c: $config) -> Self {
                    AdapterConfig::$variant(c)
                }
            }
        )?)*

        /// Every method, in the order help texts list them.
        pub const METHODS: &[Method] = &[$($module::METHOD,)*];
    };
}

registry! {
    lora => Lora(lora::LoraConfig);
    lora_pro;
    eva;
    corda => Corda(corda::CordaConfig);
    svfit => Svfit(svfit::SvfitConfig);
    loldu => Loldu(loldu::LolduConfig);
    randlora => RandLora(randlora::RandLoraConfig);
    flora => Flora(flora::FloraConfig);
    salt => Salt(salt::SaltConfig);
}

pub use lora::{LoraAdapter, LoraConfig};

/// The CLI names of every method, in registry order.
pub fn method_names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.name()).collect()
}

// The lookup lives with the registry: the core `adapter` module cannot see the method list.
impl Method {
    /// The method whose CLI name or alias is `name` (any case).
    pub fn from_cli_name(name: &str) -> Result<Self> {
        METHODS
            .iter()
            .copied()
            .find(|m| m.answers_to(name))
            .ok_or_else(|| {
                PeftError::config(
                    "method",
                    format!(
                        "unknown method `{}` (expected one of {})",
                        name.to_ascii_lowercase(),
                        method_names().join(", ")
                    ),
                )
            })
    }
}

impl AdapterConfig {
    /// The method whose file format this is.
    pub fn method(&self) -> Method {
        self.inner().method()
    }

    /// Which modules are adapted.
    pub fn targeting(&self) -> &Targeting {
        self.inner().targeting()
    }

    /// Which modules are adapted, to change.
    pub fn targeting_mut(&mut self) -> &mut Targeting {
        self.inner_mut().targeting_mut()
    }

    /// Whether base weights are stored `[in, out]` (PEFT's `fan_in_fan_out`).
    pub fn fan_in_fan_out(&self) -> bool {
        self.inner().fan_in_fan_out()
    }

    /// The weight of the method's regulariser in the training loss (0: none).
    pub fn regularizer_weight(&self) -> f64 {
        self.inner().regularizer_weight()
    }

    /// Checks every field, without looking at a model.
    pub fn validate(&self) -> Result<()> {
        self.inner().validate()
    }

    /// The JSON written to `adapter_config.json` (PEFT's field names; keys sorted as PEFT sorts).
    pub fn to_json(&self) -> Result<serde_json::Value> {
        self.inner().to_peft_json()
    }

    /// Reads `adapter_config.json` content, dispatching on `peft_type`. Unknown fields are ignored,
    /// as PEFT ignores them.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let peft_type = value
            .get("peft_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| PeftError::config("peft_type", "missing or not a string"))?;
        let config = Self::parse(peft_type, value)?
            .ok_or_else(|| PeftError::UnknownPeftType(peft_type.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Model-level tensors for a new adapter (see [`MethodConfig::init_shared`]).
    pub fn init_shared(
        &self,
        layers: &[(String, LayerGeometry)],
        device: &Device,
        rng: &mut ChaCha8Rng,
    ) -> Result<BTreeMap<String, Tensor>> {
        self.inner().init_shared(layers, device, rng)
    }

    /// A fresh adapter for one layer, drawn from `rng`.
    pub fn init_adapter(
        &self,
        ctx: &InitContext<'_>,
        rng: &mut ChaCha8Rng,
    ) -> Result<Box<dyn Adapter>> {
        self.inner().init_adapter(ctx, rng)
    }

    /// The adapter for one layer rebuilt from its saved tensors.
    pub fn load_adapter(&self, ctx: &LoadContext<'_>) -> Result<Box<dyn Adapter>> {
        self.inner().load_adapter(ctx)
    }

    /// The first segments of this method's per-layer tensor names (`lora_A`, `lora_B`).
    pub fn tensor_prefixes(&self) -> &'static [&'static str] {
        self.inner().tensor_prefixes()
    }
}
