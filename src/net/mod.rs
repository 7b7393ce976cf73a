//! Networking for the importer and upload server: an HTTP/1.1 client over TCP and rustls
//! (`http`: proxies, redirects, resumable downloads, idle timeout), a small threaded
//! HTTP(S) server with streaming request bodies and mutual TLS (`server`, also serving the
//! Prometheus progress metric), the OCI distribution client for containerDisks
//! (`registry`), a streaming multipart/form-data reader (`multipart`), the upload client
//! that feeds CDI's upload server (`upload`), and object storage for the importer: S3 with
//! SigV4 (`s3`) and Google Cloud Storage with service-account tokens (`gcs`).

#[cfg(feature = "net")]
pub mod digest;
#[cfg(feature = "net")]
pub mod gcs;
#[cfg(feature = "net")]
pub mod http;
pub mod multipart;
#[cfg(feature = "net")]
pub mod registry;
#[cfg(feature = "net")]
pub mod s3;
#[cfg(feature = "net")]
pub mod server;
#[cfg(feature = "net")]
pub mod upload;
