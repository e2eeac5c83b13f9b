//! The node's container runtime (containerd), reached over its unix socket: the CRI image service, which
//! pulls an image the way the kubelet does (through the runtime's own mirror configuration, so through
//! wharf), and containerd's images API, which sets the label that keeps the kubelet's image GC away from
//! an image. Generated gRPC bindings: `k8s-cri` (CRI v1) and `containerd-client`, both on tonic.
//!
//! A connection is made per use (cheap over a unix socket): a runtime that restarts, or whose socket is
//! missing, costs one failed call, never a stuck client.

use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetImageRequest, ListImagesRequest, UpdateImageRequest};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{ImageSpec, ImageStatusRequest, PullImageRequest, VersionRequest};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint, Uri};

/// The label containerd (1.7 and later) reports as CRI `pinned`; the kubelet never garbage-collects a
/// pinned image.
pub const PIN_LABEL: &str = "io.cri-containerd.pinned";

/// Set beside [`PIN_LABEL`] when wharf set it, so that wharf removes only the pins it made (containerd pins
/// its own sandbox image, and an operator may pin by hand).
pub const WHARF_LABEL: &str = "io.wharf.pinned";

/// The containerd namespace of everything CRI does.
const CRI_NAMESPACE: &str = "k8s.io";

/// Why a runtime call failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The endpoint is not a `unix://` socket path.
    #[error("runtime endpoint {0:?}: only unix:///path sockets are supported")]
    Endpoint(String),
    /// The socket could not be reached (missing, refused, or no answer in time).
    #[error("runtime at {0}: {1}")]
    Connect(String, String),
    /// The runtime answered the call with an error.
    #[error("runtime {call}: {status}")]
    Call {
        /// The gRPC method.
        call: &'static str,
        /// The runtime's answer.
        status: tonic::Status,
    },
}

/// What the runtime holds under an image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeImage {
    /// The image id (its config's digest).
    pub id: String,
    /// `repo@sha256:…` for each manifest digest the runtime knows the image by.
    pub repo_digests: Vec<String>,
    /// CRI `pinned` (always false on runtimes that do not report it, such as containerd 1.6).
    pub pinned: bool,
}

impl RuntimeImage {
    /// Whether the runtime has the image at manifest `digest` (`sha256:…`).
    pub fn has_digest(&self, digest: &str) -> bool {
        self.repo_digests.iter().any(|d| d.rsplit_once('@').is_some_and(|(_, d)| d == digest))
    }
}

/// The runtime's name and version, as CRI `Version` gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeVersion {
    /// e.g. `containerd`.
    pub name: String,
    /// e.g. `1.6.20~ds1` or `v1.7.24`.
    pub version: String,
}

impl RuntimeVersion {
    /// Whether the runtime reports the pin label as CRI `pinned` (containerd 1.7 and later).
    pub fn reports_pinned(&self) -> bool {
        if self.name != "containerd" {
            return false;
        }
        let v = self.version.trim_start_matches('v');
        let mut parts = v.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u64>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (1, 7)
    }
}

/// A connection to the runtime.
#[derive(Debug, Clone)]
pub struct Runtime {
    channel: Channel,
    timeout: Duration,
}

impl Runtime {
    /// Connects to `endpoint` (`unix:///run/containerd/containerd.sock`); the connection and every call but a
    /// pull are bounded by `timeout`.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Runtime, RuntimeError> {
        let path = endpoint.strip_prefix("unix://").ok_or_else(|| RuntimeError::Endpoint(endpoint.to_owned()))?;
        let socket = path.to_owned();
        // The URI is a placeholder: the connector dials the socket.
        let endpoint_uri = Endpoint::from_static("http://[::]:50051");
        let connecting = endpoint_uri.connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tokio::net::UnixStream::connect(socket).await?))
            }
        }));
        let channel = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| RuntimeError::Connect(endpoint.to_owned(), format!("no connection within {timeout:?}")))?
            .map_err(|e| RuntimeError::Connect(endpoint.to_owned(), crate::telemetry::chain(&e)))?;
        Ok(Runtime { channel, timeout })
    }

    async fn bounded<T>(
        &self,
        call: &'static str,
        work: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, RuntimeError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(answer)) => Ok(answer.into_inner()),
            Ok(Err(status)) => Err(RuntimeError::Call { call, status }),
            Err(_) => Err(RuntimeError::Call { call, status: tonic::Status::deadline_exceeded("no answer in time") }),
        }
    }

    /// CRI `Version`.
    pub async fn version(&self) -> Result<RuntimeVersion, RuntimeError> {
        let mut client = RuntimeServiceClient::new(self.channel.clone());
        let v = self.bounded("Version", client.version(VersionRequest { version: "v1".into() })).await?;
        Ok(RuntimeVersion { name: v.runtime_name, version: v.runtime_version })
    }

    /// CRI `ImageStatus` of `reference`: `None` when the runtime does not have it.
    pub async fn image(&self, reference: &str) -> Result<Option<RuntimeImage>, RuntimeError> {
        let mut client = ImageServiceClient::new(self.channel.clone());
        let request = ImageStatusRequest { image: Some(spec(reference)), verbose: false };
        let status = self.bounded("ImageStatus", client.image_status(request)).await?;
        Ok(status.image.map(|i| RuntimeImage { id: i.id, repo_digests: i.repo_digests, pinned: i.pinned }))
    }

    /// CRI `PullImage` of `reference`, as the kubelet would pull it, bounded by `within` rather than the
    /// call timeout (unpacking a large image takes a while); returns the image id.
    pub async fn pull(&self, reference: &str, within: Duration) -> Result<String, RuntimeError> {
        let mut client = ImageServiceClient::new(self.channel.clone());
        let request = PullImageRequest { image: Some(spec(reference)), auth: None, sandbox_config: None };
        let bounded = Runtime { channel: self.channel.clone(), timeout: within };
        Ok(bounded.bounded("PullImage", client.pull_image(request)).await?.image_ref)
    }

    /// Pins (`true`) or unpins the runtime's image record named `reference` (in CRI's containerd namespace):
    /// sets [`PIN_LABEL`] with [`WHARF_LABEL`] beside it, or removes both, but never a [`PIN_LABEL`] that
    /// wharf did not set. Idempotent; needed again after every pull, since a pull that moves a tag replaces
    /// the record and its labels. Returns whether the record carries [`PIN_LABEL`] now (false when the
    /// runtime has no such record).
    pub async fn set_pinned(&self, reference: &str, pinned: bool) -> Result<bool, RuntimeError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let got = self.bounded("images.Get", client.get(in_cri_namespace(GetImageRequest { name: reference.into() })));
        let image = match got.await {
            Ok(answer) => answer.image,
            Err(RuntimeError::Call { status, .. }) if status.code() == tonic::Code::NotFound => None,
            Err(e) => return Err(e),
        };
        let Some(mut image) = image else { return Ok(false) };
        let has_pin = image.labels.get(PIN_LABEL).is_some_and(|v| v == "pinned");
        let ours = image.labels.contains_key(WHARF_LABEL);
        let pin_after = match (pinned, has_pin, ours) {
            (true, true, _) | (false, false, false) => return Ok(has_pin),
            // Someone else's pin: left alone.
            (false, true, false) => return Ok(true),
            (true, false, _) => {
                image.labels.insert(PIN_LABEL.into(), "pinned".into());
                image.labels.insert(WHARF_LABEL.into(), "true".into());
                true
            }
            (false, _, true) => {
                image.labels.remove(PIN_LABEL);
                image.labels.remove(WHARF_LABEL);
                false
            }
        };
        let paths = vec![format!("labels.{PIN_LABEL}"), format!("labels.{WHARF_LABEL}")];
        let mask = prost_types::FieldMask { paths };
        let request = UpdateImageRequest { image: Some(image), update_mask: Some(mask), source_date_epoch: None };
        self.bounded("images.Update", client.update(in_cri_namespace(request))).await?;
        Ok(pin_after)
    }

    /// The image records wharf pinned ([`WHARF_LABEL`]), by name.
    pub async fn pinned_by_wharf(&self) -> Result<Vec<String>, RuntimeError> {
        let mut client = ImagesClient::new(self.channel.clone());
        let filters = vec![format!("labels.\"{WHARF_LABEL}\"")];
        let listed = self.bounded("images.List", client.list(in_cri_namespace(ListImagesRequest { filters })));
        Ok(listed.await?.images.into_iter().map(|i| i.name).collect())
    }
}

fn spec(reference: &str) -> ImageSpec {
    ImageSpec { image: reference.into(), ..ImageSpec::default() }
}

fn in_cri_namespace<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("containerd-namespace", tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE));
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_is_reported_from_containerd_1_7() {
        let v = |name: &str, version: &str| RuntimeVersion { name: name.into(), version: version.into() };
        assert!(!v("containerd", "1.6.20~ds1").reports_pinned());
        assert!(v("containerd", "1.7.0").reports_pinned());
        assert!(v("containerd", "v2.0.4").reports_pinned());
        assert!(!v("cri-o", "1.30.0").reports_pinned());
    }

    #[test]
    fn digests_are_matched_after_the_repository() {
        let image = RuntimeImage {
            id: "sha256:c".into(),
            repo_digests: vec!["docker.io/library/x@sha256:aa".into()],
            pinned: false,
        };
        assert!(image.has_digest("sha256:aa"));
        assert!(!image.has_digest("sha256:a"));
    }
}
