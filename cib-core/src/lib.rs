//! The pure heart of cib.
pub mod spec;
