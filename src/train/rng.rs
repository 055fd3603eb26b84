//! The random streams training advances (dropout masks), saved in checkpoints so that a resume
//! draws the masks the uninterrupted run would have drawn.
//!
//! A stream is a ChaCha8 RNG, written as `<seed, 64 hex digits>:<stream>:<word position>`
//! (the whole state: a resume needs no seed of its own), under a name: an adapter's dropout RNG
//! is `adapter:<module path>:<adapter name>`; a task adds its own streams (the classifier's
//! dropout) under other names.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{PeftError, Result};
use crate::model::PeftModel;

/// The dropout RNG of every adapter of `model` that draws random numbers, encoded.
pub fn adapter_rng_states<M>(model: &PeftModel<M>) -> BTreeMap<String, String> {
    let mut states = BTreeMap::new();
    for layer in model.layers() {
        let module = layer.name();
        for name in layer.adapter_names() {
            if let Some(Some(rng)) = layer.with_adapter(&name, |a| a.dropout_rng()) {
                states.insert(adapter_key(&module, &name), encode_rng(&rng));
            }
        }
    }
    states
}

/// Restores every adapter's dropout RNG of `model` that `states` names. Adapters `states` does
/// not name are left alone (a checkpoint written before these states were saved names none);
/// a name that is no adapter of `model`, or a state that does not parse, is an error naming it.
pub fn restore_adapter_rng_states<M>(
    model: &PeftModel<M>,
    states: &BTreeMap<String, String>,
) -> Result<()> {
    let mut known = BTreeMap::new();
    for layer in model.layers() {
        let module = layer.name();
        for name in layer.adapter_names() {
            known.insert(adapter_key(&module, &name), (layer, name));
        }
    }
    for (key, value) in states.iter().filter(|(k, _)| k.starts_with(ADAPTER_PREFIX)) {
        let (layer, name) = known.get(key).ok_or_else(|| {
            PeftError::config(
                format!("rng_states.{key}"),
                "names no adapter of the model being trained",
            )
        })?;
        let rng = decode_rng(key, value)?;
        layer.with_adapter(name, |a| a.set_dropout_rng(rng));
    }
    Ok(())
}

/// An RNG's whole state as text: `<seed hex>:<stream>:<word position>`.
pub fn encode_rng(rng: &ChaCha8Rng) -> String {
    let seed: String = rng.get_seed().iter().map(|b| format!("{b:02x}")).collect();
    format!("{seed}:{}:{}", rng.get_stream(), rng.get_word_pos())
}

/// The RNG [`encode_rng`] wrote; the error names the state `key`.
pub fn decode_rng(key: &str, text: &str) -> Result<ChaCha8Rng> {
    let bad = || {
        PeftError::config(
            format!("rng_states.{key}"),
            format!("`{text}` is not an RNG state (<seed hex>:<stream>:<word position>)"),
        )
    };
    let mut parts = text.split(':');
    let (Some(seed_hex), Some(stream), Some(pos), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if seed_hex.len() != 64 || !seed_hex.is_ascii() {
        return Err(bad());
    }
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(stream.parse().map_err(|_| bad())?);
    rng.set_word_pos(pos.parse().map_err(|_| bad())?);
    Ok(rng)
}

const ADAPTER_PREFIX: &str = "adapter:";

fn adapter_key(module: &str, adapter: &str) -> String {
    format!("{ADAPTER_PREFIX}{module}:{adapter}")
}
