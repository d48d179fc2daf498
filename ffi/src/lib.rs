//! C ABI of the provider (issue 4).
