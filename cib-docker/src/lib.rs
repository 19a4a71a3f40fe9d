//! The Docker executor for cib (see issue 4): not written yet; this crate only reserves its place in the workspace.
