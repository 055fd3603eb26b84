//! The order examples are drawn in: a seeded permutation per epoch, restorable from a
//! checkpoint.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// The seeded, epoch-wise shuffled stream of example indices.
#[derive(Debug, Clone)]
pub(super) struct Sampler {
    rng: ChaCha8Rng,
    order: Vec<usize>,
    /// Data epoch in progress (0-based).
    pub(super) epoch: usize,
    /// Examples of that epoch already used.
    pub(super) position: usize,
    /// The RNG's word position before that epoch's shuffle.
    pub(super) epoch_word_pos: u128,
}

impl Sampler {
    pub(super) fn new(n: usize, seed: u64) -> Self {
        let mut s = Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            order: Vec::new(),
            epoch: 0,
            position: 0,
            epoch_word_pos: 0,
        };
        s.shuffle(n);
        s
    }

    pub(super) fn restore(
        n: usize,
        seed: u64,
        epoch: usize,
        word_pos: u128,
        position: usize,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_word_pos(word_pos);
        let mut s = Self {
            rng,
            order: Vec::new(),
            epoch,
            position: 0,
            epoch_word_pos: word_pos,
        };
        s.shuffle(n);
        s.position = position;
        s
    }

    fn shuffle(&mut self, n: usize) {
        self.epoch_word_pos = self.rng.get_word_pos();
        self.order = (0..n).collect();
        self.order.shuffle(&mut self.rng);
        self.position = 0;
    }

    pub(super) fn next_batch(&mut self, size: usize) -> Vec<usize> {
        let n = self.order.len();
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.position >= n {
                self.epoch += 1;
                self.shuffle(n);
            }
            out.push(self.order[self.position]);
            self.position += 1;
        }
        out
    }
}
