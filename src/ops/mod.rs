//! The custom operators that rewritten models use, declared once and implemented for the CPU.
//!
//! [`ghost_shift`] holds the one declaration of `ai.ghostsr::GhostShift` (name, domain, version,
//! attribute names, element types: [`GHOST_SHIFT`]), its attributes ([`GhostShiftAttrs`]) and
//! the CPU kernel ([`GhostShiftAttrs::run`]). The rewriter ([`crate::emit`]) and the ONNX Runtime
//! plugin ([`crate::plugin`]) both read the names from here.

pub mod ghost_shift;

pub use ghost_shift::{ElemType, Element, GHOST_SHIFT, GhostShiftAttrs, OpSpec};
