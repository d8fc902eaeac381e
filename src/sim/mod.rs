//! The Webex API simulator: a real HTTPS server for tests, benchmarks and the sandbox. Never used by `serve`.
