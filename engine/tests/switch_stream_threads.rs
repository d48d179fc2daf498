//! The stream tests of `switch_stream.rs` with the provider in threads mode:
//! poller threads and a dispatcher deliver the completions of streams whose
//! threads sleep.

#[path = "switch_stream.rs"]
mod switch_stream;
