//! The CubeCL kernels. Each file holds its `#[cube]` functions; the launch wrappers, which
//! validate before dispatch, live in [`crate::launch`].
//!
//! `missing_docs` is allowed here because `#[cube]` expands every kernel into helper modules
//! and structs that cannot carry docs; the kernels themselves are documented.

#[allow(missing_docs)]
pub mod backward;
#[allow(missing_docs)]
pub mod block;
#[allow(missing_docs)]
pub mod forward;
#[allow(missing_docs)]
pub mod reduce;
