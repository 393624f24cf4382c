//! Weights that travel beside a plan: fine-tuned (by a trainer) or refit (by calibration)
//! values for the original model's initializers, keyed by the original initializer names and in
//! their original shapes.

use std::collections::BTreeMap;

/// One float32 tensor in the original initializer's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightTensor {
    pub dims: Vec<i64>,
    pub data: Vec<f32>,
}

/// Replacement values for initializers of the original model, by initializer name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WeightSet {
    pub tensors: BTreeMap<String, WeightTensor>,
}
