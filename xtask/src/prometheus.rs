//! A real Prometheus server (Debian's) in a lab namespace, scraping the
//! fabric daemons, and a small client for its HTTP query API.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    fmt::Write as _,
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    lab::Lab,
    netns::{join, within},
};

const LISTEN: &str = "127.0.0.1:9090";

/// A scrape target: labels and `ip:port`.
pub struct Target {
    pub labels: Vec<(&'static str, String)>,
    pub address: String,
}

pub struct Prometheus {
    ns: String,
}

/// GET `url` from inside namespace `ns`; returns (status, body).
pub fn http_get(ns: &str, url: &str, query: &[(&str, &str)]) -> Result<(u16, String)> {
    let url = url.to_owned();
    let query: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    join(within(ns, move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut request = agent.get(&url);
        for (k, v) in &query {
            request = request.query(k, v);
        }
        let response = request.call().with_context(|| format!("GET {url}"))?;
        let status = response.status().as_u16();
        let body = response.into_body().read_to_string()?;
        Ok((status, body))
    }))
}

impl Prometheus {
    /// Writes a config scraping `targets` every second and starts the server
    /// in `ns`, waiting until it serves queries.
    pub fn start(lab: &mut Lab, ns: &str, targets: &[Target]) -> Result<Self> {
        let mut config = String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: ligo-fabric\n    static_configs:\n");
        for t in targets {
            let _ = writeln!(
                config,
                "      - targets: ['{}']\n        labels:",
                t.address
            );
            for (k, v) in &t.labels {
                let _ = writeln!(config, "          {k}: '{v}'");
            }
        }
        let config_path = lab.file("prometheus.yml");
        let data_dir = lab.file("prometheus-data");
        fs::write(&config_path, config)?;
        let args = [
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", data_dir.display()),
            format!("--web.listen-address={LISTEN}"),
        ];
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        lab.spawn(ns, "prometheus", OsStr::new("prometheus"), &args)?;
        let prometheus = Self { ns: ns.into() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http_get(ns, &format!("http://{LISTEN}/-/ready"), &[]) {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(lab.log_path("prometheus")).unwrap_or_default();
                bail!("prometheus not ready after 30 s:\n{log}");
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// An instant query: each series' labels and value.
    pub fn query(&self, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let (status, body) = http_get(
            &self.ns,
            &format!("http://{LISTEN}/api/v1/query"),
            &[("query", promql)],
        )?;
        let json: Value =
            serde_json::from_str(&body).with_context(|| format!("query {promql}: {body}"))?;
        if status != 200 || json["status"] != "success" {
            bail!("query {promql} failed ({status}): {body}");
        }
        let mut series = vec![];
        for r in json["data"]["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .unwrap_or_default();
            let value = r["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            series.push((labels, value));
        }
        Ok(series)
    }

    /// The single value of `promql`, once `accept` holds (or the last one
    /// seen, as an error, after `timeout`).
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        accept: impl Fn(f64) -> bool,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            let values = self.query(promql)?;
            if let [(_, v)] = values.as_slice() {
                if accept(*v) {
                    return Ok(*v);
                }
                last = Some(*v);
            }
            if Instant::now() > deadline {
                bail!("{promql}: last value {last:?}, series {values:?}");
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}
