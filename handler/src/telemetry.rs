//! Metrics and traces, through OpenTelemetry.
//!
//! The engine records what happened on [`Metrics`]: instruments from the process-wide meter
//! provider, which does nothing until [`Telemetry::start`] installs one. Where the numbers go
//! depends on how the binary runs:
//!
//! * in Azure, `APPLICATIONINSIGHTS_CONNECTION_STRING` turns on the Application Insights
//!   exporter: metrics every minute (the `customMetrics` table, where the alerts look) and one
//!   trace span per invocation (`requests`). A custom handler has no Functions worker to
//!   collect telemetry for it, so it sends its own, straight to the ingestion endpoint. With
//!   `APPLICATIONINSIGHTS_AUTHENTICATION_STRING=Authorization=AAD[;ClientId=<id>]` it sends
//!   under a managed identity's token (the resource's local auth can then be off);
//! * `handler local` serves the same instruments at `GET /metrics` in Prometheus text.
//!
//! The instruments are seed 003's eight, named as it names them, each with the integration,
//! tenant and provider as dimensions (the queue depth by tenant).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, ObservableGauge};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};

use crate::identity::TokenSource;
use crate::model::SyncStats;
use crate::settings::{AppInsightsSetting, IngestionAuth};

/// The instrumentation scope and the service name in every exported item.
const SERVICE: &str = "func-sync";

/// The Entra scope of Azure Monitor ingestion.
const MONITOR_SCOPE: &str = "https://monitor.azure.com//.default";

/// How often metrics leave for Application Insights.
const EXPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Histogram buckets in milliseconds: a webhook job takes tens of milliseconds, a full sync of
/// a large tenant many minutes.
const LATENCY_BUCKETS_MS: [f64; 14] = [
    10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_500.0, 5_000.0, 10_000.0, 30_000.0, 60_000.0,
    300_000.0, 900_000.0,
];

/// The instruments' names, as seed 003 names them and as the alerts query them.
pub const INSTRUMENTS: [&str; 8] = [
    "sync_jobs_processed",
    "sync_jobs_failed",
    "sync_records_created",
    "sync_records_updated",
    "sync_latency_ms",
    "sync_queue_depth",
    "writeback_latency_ms",
    "token_refresh_failures",
];

/// Which integration a measurement is about.
#[derive(Debug, Clone, Copy)]
pub struct Dimensions<'a> {
    pub integration_id: &'a str,
    pub tenant_id: &'a str,
    pub provider: &'a str,
}

impl Dimensions<'_> {
    fn attributes(&self) -> [KeyValue; 3] {
        [
            KeyValue::new("integrationId", self.integration_id.to_string()),
            KeyValue::new("tenantId", self.tenant_id.to_string()),
            KeyValue::new("provider", self.provider.to_string()),
        ]
    }
}

/// The jobs queued or running per tenant at the last scheduler tick this instance ran.
#[derive(Debug, Default)]
struct PendingJobs {
    by_tenant: BTreeMap<String, u64>,
    seen_at: Option<Instant>,
}

impl PendingJobs {
    /// How long a tick's count is reported: one export's interval, as long as the timer's, so
    /// that each tick is exported once. The next tick may run on another instance; one
    /// reporting its last count for good would add a stale count to the current one, tenant by
    /// tenant, wherever the instances' metrics are summed.
    const REPORTED_FOR: Duration = EXPORT_INTERVAL;

    fn is_current(&self, now: Instant) -> bool {
        self.seen_at
            .is_some_and(|at| now.saturating_duration_since(at) < Self::REPORTED_FOR)
    }
}

/// The app's instruments. Cheap to clone; recording on them never fails or blocks.
#[derive(Clone)]
pub struct Metrics {
    jobs_processed: Counter<u64>,
    jobs_failed: Counter<u64>,
    records_created: Counter<u64>,
    records_updated: Counter<u64>,
    sync_latency: Histogram<f64>,
    /// What the last scheduler tick on this instance saw; observed when metrics are
    /// collected, so a tenant with nothing pending drops out instead of showing a stale count,
    /// and an instance whose tick was long ago reports none.
    pending: Arc<Mutex<PendingJobs>>,
    _queue_depth: ObservableGauge<u64>,
    writeback_latency: Histogram<f64>,
    token_refresh_failures: Counter<u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new(meter: &Meter) -> Self {
        let latency = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_description(description)
                .with_unit("ms")
                .with_boundaries(LATENCY_BUCKETS_MS.to_vec())
                .build()
        };
        let pending = Arc::new(Mutex::new(PendingJobs::default()));
        let observed = pending.clone();
        let queue_depth = meter
            .u64_observable_gauge(INSTRUMENTS[5])
            .with_description("Sync jobs queued or running, per tenant, at the last scheduler tick")
            .with_callback(move |gauge| {
                let pending = observed.lock().unwrap_or_else(|p| p.into_inner());
                if !pending.is_current(Instant::now()) {
                    return;
                }
                for (tenant, count) in pending.by_tenant.iter() {
                    gauge.observe(*count, &[KeyValue::new("tenantId", tenant.clone())]);
                }
            })
            .build();
        Self {
            jobs_processed: meter
                .u64_counter(INSTRUMENTS[0])
                .with_description("Sync jobs finished, whatever their outcome")
                .build(),
            jobs_failed: meter
                .u64_counter(INSTRUMENTS[1])
                .with_description(
                    "Sync jobs that finished failed (dead-lettered, or no record landed)",
                )
                .build(),
            records_created: meter
                .u64_counter(INSTRUMENTS[2])
                .with_description("Shards created by inbound syncs")
                .build(),
            records_updated: meter
                .u64_counter(INSTRUMENTS[3])
                .with_description("Shards updated by inbound syncs")
                .build(),
            sync_latency: latency(INSTRUMENTS[4], "Duration of a sync job"),
            pending,
            _queue_depth: queue_depth,
            writeback_latency: latency(INSTRUMENTS[6], "Duration of a write-back"),
            token_refresh_failures: meter
                .u64_counter(INSTRUMENTS[7])
                .with_description("OAuth token refreshes that failed")
                .build(),
        }
    }

    /// Instruments of the process-wide meter provider (inert until [`Telemetry::start`]).
    pub fn global() -> Self {
        Self::new(&opentelemetry::global::meter(SERVICE))
    }

    /// A sync job finished: `failed` when its history record says so.
    pub fn sync_finished(
        &self,
        on: Dimensions<'_>,
        stats: &SyncStats,
        duration_ms: u64,
        failed: bool,
    ) {
        let attributes = on.attributes();
        self.jobs_processed.add(1, &attributes);
        self.jobs_failed.add(u64::from(failed), &attributes);
        self.records_created.add(stats.shards_created, &attributes);
        self.records_updated.add(stats.shards_updated, &attributes);
        self.sync_latency.record(duration_ms as f64, &attributes);
    }

    /// The jobs queued or running per tenant, as a scheduler tick saw them; tenants not
    /// listed have none.
    pub fn pending_jobs(&self, by_tenant: BTreeMap<String, u64>) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = PendingJobs {
            by_tenant,
            seen_at: Some(Instant::now()),
        };
    }

    /// A write-back reached the provider (or failed there) after `duration_ms`.
    pub fn writeback_finished(&self, on: Dimensions<'_>, duration_ms: u64) {
        self.writeback_latency
            .record(duration_ms as f64, &on.attributes());
    }

    /// A token refresh was tried: failures count, and a success keeps the series at its value
    /// so that an alert on it sees zero rather than nothing.
    pub fn token_refreshed(&self, on: Dimensions<'_>, failed: bool) {
        self.token_refresh_failures
            .add(u64::from(failed), &on.attributes());
    }
}

/// The meter and tracer providers of this process, and where their data goes.
pub struct Telemetry {
    meters: Option<SdkMeterProvider>,
    tracer: Option<SdkTracerProvider>,
    prometheus: Option<PrometheusText>,
}

impl Telemetry {
    /// Installs the process-wide meter provider: exporting to Application Insights when
    /// `app_insights` is set, and collecting for [`PrometheusText`] when `prometheus`. With
    /// neither, nothing is installed and every instrument stays inert. Call within the async
    /// runtime: exports are sent from it.
    pub fn start(
        app_insights: Option<&AppInsightsSetting>,
        entra: Option<Arc<dyn TokenSource>>,
        prometheus: bool,
    ) -> Result<Self, String> {
        let resource = Resource::builder().with_service_name(SERVICE).build();
        let mut meters = SdkMeterProvider::builder().with_resource(resource.clone());
        let mut tracer = None;
        if let Some(setting) = app_insights {
            let client = || Ingestion {
                http: reqwest::Client::new(),
                runtime: tokio::runtime::Handle::current(),
                entra: match setting.auth {
                    IngestionAuth::Key => None,
                    IngestionAuth::Entra { .. } => entra.clone(),
                },
                loopback_http: setting.loopback_http.clone(),
            };
            let exporter = |client| {
                opentelemetry_application_insights::Exporter::new_from_connection_string(
                    setting.connection_string.clone(),
                    client,
                )
                .map(|exporter| {
                    exporter.with_retry_notify(|error, delay| {
                        tracing::warn!(%error, retry_in = ?delay, "telemetry was not accepted; trying again");
                    })
                })
                .map_err(|e| format!("APPLICATIONINSIGHTS_CONNECTION_STRING: {e}"))
            };
            meters = meters.with_reader(
                PeriodicReader::builder(exporter(client())?)
                    .with_interval(EXPORT_INTERVAL)
                    .build(),
            );
            tracer = Some(
                SdkTracerProvider::builder()
                    .with_resource(resource)
                    .with_batch_exporter(exporter(client())?)
                    .build(),
            );
        }
        let mut text = None;
        if prometheus {
            let (reader, view) = PrometheusText::reader()?;
            meters = meters.with_reader(reader);
            text = Some(view);
        }
        let meters = (app_insights.is_some() || prometheus).then(|| meters.build());
        if let Some(provider) = &meters {
            opentelemetry::global::set_meter_provider(provider.clone());
        }
        Ok(Self {
            meters,
            tracer,
            prometheus: text,
        })
    }

    /// The tracer the log subscriber turns spans into trace spans with, when traces are
    /// exported.
    pub fn tracer(&self) -> Option<Tracer> {
        self.tracer.as_ref().map(|p| p.tracer(SERVICE))
    }

    /// The Prometheus view, when started with one.
    pub fn prometheus(&self) -> Option<PrometheusText> {
        self.prometheus.clone()
    }

    /// Exports what is still buffered. Called once, as the process stops.
    pub fn shutdown(&self) {
        if let Some(meters) = &self.meters
            && let Err(e) = meters.shutdown()
        {
            tracing::warn!(error = %e, "metrics were not all exported");
        }
        if let Some(tracer) = &self.tracer
            && let Err(e) = tracer.shutdown()
        {
            tracing::warn!(error = %e, "traces were not all exported");
        }
    }
}

/// The current value of every instrument in the Prometheus text format (version 0.0.4).
#[derive(Clone)]
pub struct PrometheusText(prometheus::Registry);

impl PrometheusText {
    pub const CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";

    /// A metric reader, and the view of what it collects.
    fn reader() -> Result<(opentelemetry_prometheus::PrometheusExporter, Self), String> {
        let registry = prometheus::Registry::new();
        let reader = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // The names are seed 003's as they stand: no `_total` or unit suffixes.
            .without_counter_suffixes()
            .without_units()
            .scope_info_enabled(false)
            .build()
            .map_err(|e| format!("metrics: {e}"))?;
        Ok((reader, Self(registry)))
    }

    pub fn render(&self) -> String {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        // Encoding into memory fails only on a malformed family, which the exporter never
        // builds; what encoded is still served.
        let _ = prometheus::TextEncoder::new().encode(&self.0.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The HTTP client of the Application Insights exporter. The exporter runs on the SDK's own
/// threads, outside the async runtime, so each request is spawned onto the runtime; with Entra
/// it carries a bearer token and goes to the ingestion API version that accepts one.
struct Ingestion {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
    entra: Option<Arc<dyn TokenSource>>,
    /// A loopback ingestion endpoint configured with plain http, which the exporter turns into
    /// https: its requests go back to http.
    loopback_http: Option<String>,
}

impl std::fmt::Debug for Ingestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ingestion(entra: {})", self.entra.is_some())
    }
}

#[async_trait]
impl HttpClient for Ingestion {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let http = self.http.clone();
        let entra = self.entra.clone();
        let loopback = self.loopback_http.clone();
        let sent = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let mut url = parts.uri.to_string();
            if let Some(authority) = loopback {
                url = url.replacen(
                    &format!("https://{authority}"),
                    &format!("http://{authority}"),
                    1,
                );
            }
            let mut token = None;
            if let Some(entra) = entra {
                url = url.replacen("/v2/track", "/v2.1/track", 1);
                token = Some(entra.token(MONITOR_SCOPE).await?);
            }
            let mut builder = http
                .request(parts.method, url)
                .headers(parts.headers)
                .body(body);
            if let Some(token) = token {
                builder = builder.bearer_auth(token);
            }
            let response = builder.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(|e| e.to_string())?;
            let mut answer = Response::new(body);
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            Ok::<_, String>(answer)
        });
        match sent.await {
            Ok(answer) => answer.map_err(HttpError::from),
            Err(e) => Err(HttpError::from(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::metrics::MeterProvider as _;

    use super::*;

    fn dimensions() -> Dimensions<'static> {
        Dimensions {
            integration_id: "int-1",
            tenant_id: "tenant-1",
            provider: "salesforce",
        }
    }

    #[tokio::test]
    async fn the_eight_instruments_show_in_prometheus_text_with_their_dimensions() {
        let (reader, view) = PrometheusText::reader().unwrap();
        let provider = SdkMeterProvider::builder().with_reader(reader).build();
        let metrics = Metrics::new(&provider.meter(SERVICE));
        let stats = SyncStats {
            shards_created: 7,
            shards_updated: 3,
            ..SyncStats::default()
        };
        metrics.sync_finished(dimensions(), &stats, 120, false);
        metrics.sync_finished(dimensions(), &SyncStats::default(), 30, true);
        metrics.pending_jobs(BTreeMap::from([("tenant-1".to_string(), 4)]));
        metrics.writeback_finished(dimensions(), 80);
        metrics.token_refreshed(dimensions(), true);

        let text = view.render();
        let labels = r#"integrationId="int-1",provider="salesforce",tenantId="tenant-1""#;
        for line in [
            format!("sync_jobs_processed{{{labels}}} 2"),
            format!("sync_jobs_failed{{{labels}}} 1"),
            format!("sync_records_created{{{labels}}} 7"),
            format!("sync_records_updated{{{labels}}} 3"),
            format!("sync_latency_ms_count{{{labels}}} 2"),
            format!("sync_latency_ms_sum{{{labels}}} 150"),
            r#"sync_queue_depth{tenantId="tenant-1"} 4"#.to_string(),
            format!("writeback_latency_ms_count{{{labels}}} 1"),
            format!("token_refresh_failures{{{labels}}} 1"),
        ] {
            assert!(text.contains(&line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn a_scheduler_ticks_count_is_reported_until_the_next_tick_and_no_longer() {
        let tick = Instant::now();
        let pending = PendingJobs {
            by_tenant: BTreeMap::from([("tenant-1".to_string(), 4)]),
            seen_at: Some(tick),
        };
        assert!(pending.is_current(tick + Duration::from_secs(59)));
        assert!(
            !pending.is_current(tick + EXPORT_INTERVAL),
            "the next tick's count, on whichever instance, is the one reported"
        );
        assert!(!PendingJobs::default().is_current(tick));
    }
}
