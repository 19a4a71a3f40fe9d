//! GitHub as VCS and notifier for cib (see issue 8): not written yet; this crate only reserves its place in the workspace.
