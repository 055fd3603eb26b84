//! Values and gradients of a function, for comparing an op against a reference.

use candle_core::{Tensor, Var};

/// Value and input gradient of `Σ f(x) ⊙ c` for a fixed weighting `c`.
pub fn value_and_grad(x: &Tensor, c: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> (Tensor, Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor());
    let loss = (&y * c.to_dtype(y.dtype()).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    (y, grads.get(var.as_tensor()).unwrap().clone())
}
