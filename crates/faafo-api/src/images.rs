//! The PNGs, kept in an object store: a local directory by default, or any
//! S3-compatible store (AWS S3, Ceph RGW, MinIO, OpenStack Swift's s3api, ...).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};
use uuid::Uuid;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error(
        "unsupported object store URL {0:?}: expected file:///absolute/directory or s3://BUCKET[/PREFIX][?endpoint=URL&region=REGION]"
    )]
    UnsupportedUrl(String),
    #[error("invalid object store URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "the bucket {bucket:?} does not exist at {endpoint}: create it first (for example `aws s3 mb s3://{bucket} --endpoint-url {endpoint}`)"
    )]
    NoBucket { bucket: String, endpoint: String },
    #[error("the {1} of fractal {0} is not in the object store")]
    Missing(Uuid, Rendition),
    #[error("the object store is unavailable")]
    Unavailable(#[source] object_store::Error),
    #[error("cannot prepare the image directory {path}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
}

/// Which picture of a fractal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendition {
    /// The image itself, as large as asked.
    Full,
    /// The same fractal rendered small for galleries (`JuliaParams::preview`); only
    /// images larger than a preview have one.
    Preview,
}

impl std::fmt::Display for Rendition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Rendition::Full => "image",
            Rendition::Preview => "preview",
        })
    }
}

/// Where fractal images live. Cloning shares the store.
#[derive(Clone)]
pub struct Images {
    store: Arc<dyn ObjectStore>,
    /// The S3 store itself, when it is one: it can sign the request that creates its
    /// bucket.
    s3: Option<Arc<object_store::aws::AmazonS3>>,
    /// The URL it was opened with (it holds no secret: credentials come from the
    /// environment), for logs and errors.
    url: String,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the store itself: its configuration holds the credentials.
        f.debug_struct("Images").field("url", &self.url).finish()
    }
}

/// A stored image, or a byte range of it, as a stream.
#[allow(missing_debug_implementations)] // A stream of bytes has nothing to show.
pub struct ImageStream {
    pub bytes: BoxStream<'static, Result<Bytes, object_store::Error>>,
    /// The bytes sent: `start..end` of the whole image.
    pub range: std::ops::Range<u64>,
    /// The size of the whole image.
    pub size: u64,
}

/// Written at start-up and read by `/readyz` to prove the store answers.
const PROBE: &str = ".faafo-ready";

/// How long one object store request may take, and how it is retried: a store that is
/// down must turn into a 503 within seconds, not after object_store's default of minutes.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRIES: usize = 2;
const RETRY_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times opening the store tries to write its probe.
const START_ATTEMPTS: u32 = 5;

impl Images {
    /// Opens the object store a URL names: `file:///absolute/directory`, or
    /// `s3://BUCKET[/PREFIX]?endpoint=URL&region=REGION` with credentials from
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and `AWS_ENDPOINT_URL`,
    /// `AWS_REGION` when the URL does not say). With an endpoint, requests are path-style,
    /// and plain HTTP is used only when the endpoint says `http://`.
    pub async fn open(url: &str) -> Result<Images, ImagesError> {
        let (store, s3): (Arc<dyn ObjectStore>, _) = if url.starts_with("file://") {
            (Arc::new(Self::directory(url).await?), None)
        } else if url.starts_with("s3://") {
            let (store, s3) = Self::s3(url)?;
            (store, Some(s3))
        } else {
            return Err(ImagesError::UnsupportedUrl(url.to_owned()));
        };
        let images = Images {
            store,
            s3,
            url: url.to_owned(),
        };
        // A store that answers oddly for a moment (several instances starting at once on
        // a new bucket were seen to get a PUT answer without an ETag from Swift) gets a
        // few more tries before the instance gives up.
        let mut attempts = 1;
        loop {
            match images.write_probe().await {
                Err(ImagesError::Unavailable(error)) if attempts < START_ATTEMPTS => {
                    tracing::warn!(%error, attempt = attempts, "the object store is not writable yet; trying again");
                    attempts += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                written => return written.map(|()| images),
            }
        }
    }

    /// Writes the probe object, creating the bucket first when it is missing.
    async fn write_probe(&self) -> Result<(), ImagesError> {
        let probe = Path::from(PROBE);
        let written = self.store.put(&probe, PutPayload::from_static(b"ok")).await;
        let Err(error) = written else {
            return Ok(());
        };
        match self.explain(error) {
            ImagesError::NoBucket { bucket, endpoint } => {
                self.create_bucket(&bucket, &endpoint).await?;
                self.store
                    .put(&probe, PutPayload::from_static(b"ok"))
                    .await
                    .map(|_| ())
                    .map_err(|e| self.explain(e))
            }
            other => Err(other),
        }
    }

    /// Creates the bucket (S3 `CreateBucket`, through a URL the store signs).
    async fn create_bucket(&self, bucket: &str, endpoint: &str) -> Result<(), ImagesError> {
        use object_store::signer::Signer;
        let no_bucket = || ImagesError::NoBucket {
            bucket: bucket.to_owned(),
            endpoint: endpoint.to_owned(),
        };
        let Some(s3) = &self.s3 else {
            return Err(no_bucket());
        };
        let url = s3
            .signed_url(
                axum::http::Method::PUT,
                &Path::from(""),
                Duration::from_secs(60),
            )
            .await
            .map_err(ImagesError::Unavailable)?;
        let created = reqwest::Client::new()
            .put(url.as_str())
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        match created {
            Ok(response) if response.status().is_success() => {
                tracing::info!(bucket, endpoint, "created the bucket");
                Ok(())
            }
            // Another instance created it meanwhile.
            Ok(response) if response.status() == reqwest::StatusCode::CONFLICT => Ok(()),
            Ok(response) => {
                tracing::warn!(bucket, status = %response.status(), "could not create the bucket");
                Err(no_bucket())
            }
            Err(error) => {
                tracing::warn!(bucket, %error, "could not create the bucket");
                Err(no_bucket())
            }
        }
    }

    async fn directory(url: &str) -> Result<object_store::local::LocalFileSystem, ImagesError> {
        let directory = url
            .strip_prefix("file://")
            .filter(|path| path.starts_with('/'));
        let Some(directory) = directory else {
            return Err(ImagesError::UnsupportedUrl(url.to_owned()));
        };
        let directory_error = |source| ImagesError::Directory {
            path: directory.to_owned(),
            source,
        };
        tokio::fs::create_dir_all(directory)
            .await
            .map_err(directory_error)?;
        // Each image and its directory entry are on disk before a put returns, as an S3
        // store's answer promises: the fractal is marked done only after its image is
        // written, and a power cut must not leave a done fractal without one.
        object_store::local::LocalFileSystem::new_with_prefix(directory)
            .map(|store| store.with_fsync(true))
            .map_err(|e| directory_error(std::io::Error::other(e)))
    }

    #[allow(clippy::type_complexity)]
    fn s3(
        url: &str,
    ) -> Result<(Arc<dyn ObjectStore>, Arc<object_store::aws::AmazonS3>), ImagesError> {
        let invalid = |reason: String| ImagesError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let parsed = url::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| invalid("no bucket: s3://BUCKET".into()))?
            .to_owned();
        let prefix = parsed.path().trim_matches('/').to_owned();
        // Client options first: setting them replaces any set before (allow_http too).
        let mut builder = AmazonS3Builder::from_env()
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_connect_timeout(CONNECT_TIMEOUT),
            )
            .with_bucket_name(&bucket);
        for (key, value) in parsed.query_pairs() {
            builder = match &*key {
                "endpoint" => builder.with_endpoint(value.trim_end_matches('/')),
                "region" => builder.with_region(value),
                other => {
                    return Err(invalid(format!(
                        "unknown parameter {other:?}: use endpoint and region"
                    )));
                }
            };
        }
        let endpoint = builder.get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint);
        if let Some(endpoint) = &endpoint {
            let parsed_endpoint = url::Url::parse(endpoint)
                .map_err(|e| invalid(format!("endpoint {endpoint:?}: {e}")))?;
            if !matches!(parsed_endpoint.scheme(), "http" | "https") {
                return Err(invalid(format!(
                    "endpoint {endpoint:?} must be http:// or https://"
                )));
            }
            builder = builder
                .with_allow_http(parsed_endpoint.scheme() == "http")
                // Buckets as path segments: what every S3-compatible server answers.
                .with_virtual_hosted_style_request(false);
        }
        if builder
            .get_config_value(&object_store::aws::AmazonS3ConfigKey::Region)
            .is_none()
        {
            builder = builder.with_region("us-east-1");
        }
        let store = builder
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: RETRIES,
                retry_timeout: RETRY_TIMEOUT,
            })
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let store = Arc::new(store);
        if prefix.is_empty() {
            Ok((Arc::clone(&store) as Arc<dyn ObjectStore>, store))
        } else {
            let prefixed = object_store::prefix::PrefixStore::new(
                Arc::clone(&store) as Arc<dyn ObjectStore>,
                Path::from(prefix),
            );
            Ok((Arc::new(prefixed), store))
        }
    }

    /// Turns an error of the first write into what the user should do about it.
    fn explain(&self, error: object_store::Error) -> ImagesError {
        let text = error.to_string();
        if text.contains("NoSuchBucket") || text.contains("does not exist") {
            let bucket = url::Url::parse(&self.url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_owned))
                .unwrap_or_default();
            let endpoint = self
                .s3
                .as_ref()
                .and_then(|_| {
                    url::Url::parse(&self.url).ok().and_then(|u| {
                        u.query_pairs()
                            .find(|(k, _)| k == "endpoint")
                            .map(|(_, v)| v.into_owned())
                    })
                })
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                .unwrap_or_else(|| "AWS".into());
            return ImagesError::NoBucket { bucket, endpoint };
        }
        ImagesError::Unavailable(error)
    }

    /// `fractals/ab/ab12...png` (and `...preview.png`): spread over 256 prefixes, so no
    /// directory of a filesystem store (and no key prefix of an S3 one) takes every write.
    fn key(uuid: Uuid, rendition: Rendition) -> Path {
        let text = uuid.to_string();
        let suffix = match rendition {
            Rendition::Full => "png",
            Rendition::Preview => "preview.png",
        };
        Path::from(format!("fractals/{}/{text}.{suffix}", &text[..2]))
    }

    /// Stores a PNG of `uuid`, atomically: readers see the whole image or none.
    pub async fn put(
        &self,
        uuid: Uuid,
        rendition: Rendition,
        png: Bytes,
    ) -> Result<(), ImagesError> {
        self.store
            .put(&Self::key(uuid, rendition), PutPayload::from_bytes(png))
            .await
            .map_err(ImagesError::Unavailable)?;
        Ok(())
    }

    pub async fn get(&self, uuid: Uuid, rendition: Rendition) -> Result<Bytes, ImagesError> {
        let found = self.fetch(uuid, rendition, GetOptions::default()).await?;
        found.bytes().await.map_err(ImagesError::Unavailable)
    }

    /// A PNG of `uuid`, or the bytes `range` of it, streamed from the store (never held
    /// whole in memory).
    pub async fn stream(
        &self,
        uuid: Uuid,
        rendition: Rendition,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<ImageStream, ImagesError> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let found = self.fetch(uuid, rendition, options).await?;
        let (range, size) = (found.range.clone(), found.meta.size);
        Ok(ImageStream {
            bytes: found.into_stream(),
            range,
            size,
        })
    }

    async fn fetch(
        &self,
        uuid: Uuid,
        rendition: Rendition,
        options: GetOptions,
    ) -> Result<object_store::GetResult, ImagesError> {
        match self
            .store
            .get_opts(&Self::key(uuid, rendition), options)
            .await
        {
            Ok(found) => Ok(found),
            Err(object_store::Error::NotFound { .. }) => Err(ImagesError::Missing(uuid, rendition)),
            Err(e) => Err(ImagesError::Unavailable(e)),
        }
    }

    /// Removes every PNG of `uuid`; one that is not there is already removed.
    pub async fn delete(&self, uuid: Uuid) -> Result<(), ImagesError> {
        for rendition in [Rendition::Preview, Rendition::Full] {
            match self.store.delete(&Self::key(uuid, rendition)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(ImagesError::Unavailable(e)),
            }
        }
        Ok(())
    }

    /// Succeeds when the store answers reads.
    pub async fn probe(&self) -> Result<(), ImagesError> {
        self.store
            .head(&Path::from(PROBE))
            .await
            .map(|_| ())
            .map_err(ImagesError::Unavailable)
    }
}
