//! The key/value cache that generation appends to.

use candle_core::Tensor;

/// Keys and values of one layer, `[B, n_kv, T_cached, d]` each.
pub(super) type LayerKv = Option<(Tensor, Tensor)>;

/// Keys and values of past positions, one entry per layer, for generation.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<LayerKv>,
    pub(super) len: usize,
}

impl KvCache {
    /// Number of positions run through the cache (a sliding layer keeps only the last
    /// `window − 1` of their keys).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every cached position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }
}
