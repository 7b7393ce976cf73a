//! Networking for the importer and upload server: an HTTP/1.1 client over TCP and rustls
//! (`http`: proxies, redirects, resumable downloads, idle timeout), a small threaded
//! HTTP(S) server with streaming request bodies and mutual TLS (`server`, also serving the
//! Prometheus progress metric), and the OCI distribution client for containerDisks
//! (`registry`).

pub mod http;
pub mod registry;
pub mod server;
