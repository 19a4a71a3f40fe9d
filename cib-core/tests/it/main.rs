//! cib-core's integration tests, in one binary so that linking happens once.

mod machine;
mod lease;
mod spec;
mod spec_fuzz;
mod spec_schema;
