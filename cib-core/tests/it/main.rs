//! cib-core's integration tests, in one binary so that linking happens once.

mod artifacts;
mod conformance;
mod engine;
mod lease;
mod machine;
mod matrix;
mod operator_limits;
mod policy;
mod publish;
mod replay;
mod spec;
mod spec_fuzz;
mod spec_limits;
mod spec_schema;
mod workflow;
