//! cib-chat's integration tests: the fakes against the contracts, and the notifier against the
//! fakes over real HTTP.

mod fakes;
mod notifier;
