//! `GET /` on the management API (behind its token like the rest of it): the status page.
//! One server-rendered HTML page, no JavaScript, reloading itself every few seconds:
//! every model version with its state, workers, queue depth, and its last minute of
//! answers (rate, p50/p95/p99); its placement drawn as a strip of its units coloured by
//! device (GPU, CPU, disk) and sized by bytes; the plan's notes; and each managed
//! device's budget, used and free.
//!
//! [`render`] is pure (what the page says, from [`StatusPage`]); [`page`] gathers the view.

use std::fmt::Write as _;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::MethodRouter;
use spillway_placement::{ByteSize, Device, DeviceType};

use crate::app::AppState;
use crate::devices::manager::PoolView;
use crate::lifecycle::model::ModelDescription;

/// Seconds between the page's reloads.
pub const REFRESH_SECONDS: u32 = 5;

/// `GET /` (the management API adds its `OPTIONS /` to the same route).
pub fn get(state: AppState) -> MethodRouter {
    axum::routing::get(move || page(state.clone()))
}

/// What the page shows.
pub struct StatusPage {
    pub version: &'static str,
    pub models: Vec<ModelDescription>,
    pub pools: Vec<PoolView>,
    pub offload_strategy: String,
    /// What the model store's watcher reports, when it runs.
    pub store: Option<crate::store::watch::ReportInner>,
}

async fn page(state: AppState) -> impl IntoResponse {
    let mut models: Vec<ModelDescription> = state
        .registry()
        .all()
        .iter()
        .map(|model| model.describe())
        .collect();
    models
        .sort_by(|a, b| (&a.model_name, &a.model_version).cmp(&(&b.model_name, &b.model_version)));
    let view = StatusPage {
        version: env!("CARGO_PKG_VERSION"),
        models,
        pools: state.devices().pools(),
        offload_strategy: format!("{:?}", state.config().devices.offload_strategy).to_lowercase(),
        store: state
            .config()
            .watch_model_store
            .then(|| state.store_watch().snapshot()),
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        render(&view),
    )
}

/// Text made safe for HTML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The colour class of a device: `gpu`, `cpu` or `disk`.
fn device_class(device: &Device) -> &'static str {
    match device.kind {
        DeviceType::Cuda | DeviceType::Metal => "gpu",
        DeviceType::Cpu => "cpu",
        DeviceType::Disk => "disk",
    }
}

/// The class of a pool named by the device manager ("cpu", "cuda:0", ...).
fn pool_class(device: &str) -> &'static str {
    match device.parse::<Device>() {
        Ok(device) => device_class(&device),
        Err(_) => "cpu",
    }
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#f6f7f9}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
.sub{color:#5b6475;margin-bottom:16px}
section.model,section.pool{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 16px;margin:0 0 12px}
.head{display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}
.name{font-weight:600;font-size:15px}
.state{font-size:12px;padding:1px 8px;border-radius:10px;background:#e4e7ee}
.state.READY{background:#d6f5df;color:#145c2c}.state.LOADING{background:#fff1c9;color:#7a5800}
.state.FAILED{background:#fde0e0;color:#8a1c1c}.state.UNLOADED{background:#e4e7ee;color:#444}
.stats{display:flex;gap:20px;flex-wrap:wrap;margin:8px 0;color:#333}
.stats b{font-weight:600}
.strip{display:flex;height:26px;border-radius:4px;overflow:hidden;border:1px solid #cfd5df;margin:6px 0}
.unit{min-width:3px;border-right:1px solid rgba(255,255,255,.6)}
.gpu{background:#7b4fd6}.cpu{background:#3b82c4}.disk{background:#e08a2c}
.legend span{display:inline-block;margin-right:14px}.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px}
.devices{font-size:12px;color:#5b6475}
.notes{margin:6px 0 0 18px;padding:0;color:#5b6475;font-size:12px}
.error{color:#8a1c1c}
.bar{height:14px;background:#e4e7ee;border-radius:3px;overflow:hidden;margin:6px 0;max-width:600px}
.bar div{height:100%}
table{border-collapse:collapse;font-size:12px}td{padding:1px 10px 1px 0}
";

/// The page.
pub fn render(view: &StatusPage) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>Spillway</title><style>{STYLE}</style></head><body>\
         <h1>Spillway</h1><div class=\"sub\">version {} · {} model versions · \
         evicting by <b>{}</b> · reloads every {REFRESH_SECONDS} s</div>",
        escape(view.version),
        view.models.len(),
        escape(&view.offload_strategy),
    );
    html.push_str(
        "<div class=\"legend\"><span><i class=\"gpu\"></i>GPU</span>\
         <span><i class=\"cpu\"></i>CPU</span><span><i class=\"disk\"></i>disk \
         (streamed each pass)</span></div>",
    );
    html.push_str("<h2>Models</h2>");
    if view.models.is_empty() {
        html.push_str("<p>No model is registered.</p>");
    }
    for model in &view.models {
        render_model(&mut html, model);
    }
    if let Some(store) = &view.store {
        render_store(&mut html, store);
    }
    html.push_str("<h2>Devices</h2>");
    for pool in &view.pools {
        render_pool(&mut html, pool);
    }
    html.push_str("</body></html>");
    html
}

fn render_model(html: &mut String, m: &ModelDescription) {
    let key = format!("{}/{}", m.model_name, m.model_version);
    let _ = write!(
        html,
        "<section class=\"model\" data-model=\"{}\" data-version=\"{}\" data-state=\"{}\">\
         <div class=\"head\"><span class=\"name\">{}</span>\
         <span class=\"state {}\">{}</span><span class=\"devices\">{} · {}</span></div>",
        escape(&m.model_name),
        escape(&m.model_version),
        escape(&m.status),
        escape(&key),
        escape(&m.status),
        escape(&m.status),
        escape(
            serde_json::to_value(m.handler)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .as_deref()
                .unwrap_or("handler")
        ),
        escape(m.device_state.unwrap_or("not loaded")),
    );
    let busy = m.workers.iter().filter(|w| w.status == "BUSY").count();
    let _ = write!(
        html,
        "<div class=\"stats\"><span>workers <b data-stat=\"workers\">{}</b> ({busy} busy)</span>\
         <span>queue <b data-stat=\"queue\">{}</b></span>",
        m.workers.len(),
        m.queue_depth.unwrap_or(0),
    );
    match &m.recent {
        Some(r) => {
            let _ = write!(
                html,
                "<span>last minute <b data-stat=\"rate\">{:.2}</b> req/s</span>\
                 <span>p50 <b data-stat=\"p50\">{:.1}</b> ms</span>\
                 <span>p95 <b>{:.1}</b> ms</span><span>p99 <b>{:.1}</b> ms</span>\
                 <span>5xx <b>{}</b></span>",
                r.per_second, r.p50_ms, r.p95_ms, r.p99_ms, r.server_errors,
            );
        }
        None => html.push_str("<span>no answer in the last minute</span>"),
    }
    html.push_str("</div>");
    if let Some(p) = &m.loading_progress {
        let share = if p.total_bytes == 0 {
            0.0
        } else {
            (100.0 * p.done_bytes as f64 / p.total_bytes as f64).min(100.0)
        };
        let _ = write!(
            html,
            "<div class=\"devices\" data-progress=\"{share:.0}\">{}: {} of {} ({share:.0} %), {:.1} MB/s</div>\
             <div class=\"bar\"><div class=\"cpu\" style=\"width:{share:.1}%\"></div></div>",
            escape(&p.stage),
            ByteSize(p.done_bytes),
            ByteSize(p.total_bytes),
            p.bytes_per_second / 1e6,
        );
    }
    if let Some(error) = &m.error {
        let _ = write!(html, "<div class=\"error\">{}</div>", escape(error));
    }
    if let Some(plan) = &m.placement {
        let total: u64 = plan.units.iter().map(|u| u.bytes).sum::<u64>().max(1);
        html.push_str("<div class=\"strip\">");
        for unit in &plan.units {
            let class = device_class(&unit.device);
            let _ = write!(
                html,
                "<div class=\"unit {class}\" data-unit=\"{}\" data-device=\"{}\" \
                 style=\"flex-grow:{}\" title=\"{} · {} · {}\"></div>",
                escape(&unit.name),
                unit.device,
                // Proportional to bytes (in KiB, so the numbers stay small).
                (unit.bytes / 1024).max(1),
                escape(&unit.name),
                unit.device,
                ByteSize(unit.bytes),
            );
        }
        html.push_str("</div><div class=\"devices\">");
        let shares: Vec<String> = plan
            .devices
            .iter()
            .filter(|d| d.weights > 0)
            .map(|d| {
                format!(
                    "{}: {} ({:.0} %)",
                    d.device,
                    ByteSize(d.weights),
                    100.0 * d.weights as f64 / total as f64
                )
            })
            .collect();
        let _ = write!(
            html,
            "{} · strategy {} · disk units run on {} · {} streamed per pass</div>",
            escape(&shares.join(" · ")),
            escape(&plan.strategy),
            plan.stream_device,
            ByteSize(plan.streamed_bytes_per_forward),
        );
        if !plan.notes.is_empty() {
            html.push_str("<ul class=\"notes\">");
            for note in &plan.notes {
                let _ = write!(html, "<li>{}</li>", escape(note));
            }
            html.push_str("</ul>");
        }
    }
    html.push_str("</section>");
}

fn render_store(html: &mut String, store: &crate::store::watch::ReportInner) {
    html.push_str("<h2>Model store (watched)</h2><section class=\"pool\" data-store=\"watched\">");
    if store.pending.is_empty() && store.problems.is_empty() {
        html.push_str("<div class=\"devices\">every archive is taken</div>");
    }
    for name in &store.pending {
        let _ = write!(
            html,
            "<div data-pending=\"{}\">{}: waiting for it to stop changing</div>",
            escape(name),
            escape(name)
        );
    }
    for (name, why) in &store.problems {
        let _ = write!(
            html,
            "<div class=\"error\" data-problem=\"{}\">{}: {}</div>",
            escape(name),
            escape(name),
            escape(why)
        );
    }
    html.push_str("</section>");
}

fn render_pool(html: &mut String, pool: &PoolView) {
    let class = pool_class(&pool.device);
    let percent = if pool.budget == 0 {
        0.0
    } else {
        100.0 * pool.used as f64 / pool.budget as f64
    };
    let _ = write!(
        html,
        "<section class=\"pool\" data-pool=\"{}\"><div class=\"head\">\
         <span class=\"name\">{}</span><span class=\"devices\">budget {} · used \
         <b data-stat=\"used\">{}</b> · free {}</span></div>\
         <div class=\"bar\"><div class=\"{class}\" style=\"width:{percent:.1}%\"></div></div>",
        escape(&pool.device),
        escape(&pool.device),
        ByteSize(pool.budget),
        ByteSize(pool.used),
        ByteSize(pool.free),
    );
    if !pool.models.is_empty() {
        html.push_str("<table>");
        for holder in &pool.models {
            let _ = write!(
                html,
                "<tr><td>{}/{}</td><td>{}</td><td>{}</td><td>last used {}</td></tr>",
                escape(&holder.model_name),
                escape(&holder.model_version),
                ByteSize(holder.bytes),
                if holder.loading { "loading" } else { "" },
                escape(&holder.last_used),
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_models_and_files_is_escaped() {
        assert_eq!(
            escape(r#"<script>"a" & 'b'</script>"#),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn an_empty_server_says_so_and_shows_its_pools() {
        let page = render(&StatusPage {
            version: "0.1.0",
            models: vec![],
            pools: vec![PoolView {
                device: "cpu".into(),
                budget: 1 << 30,
                used: 1 << 28,
                free: 3 << 28,
                models: vec![],
            }],
            offload_strategy: "restart".into(),
            store: None,
        });
        assert!(page.contains("No model is registered."));
        assert!(page.contains("data-pool=\"cpu\""));
        assert!(page.contains("width:25.0%"), "used a quarter of the budget");
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(!page.contains("<script"), "no JavaScript");
    }

    #[test]
    fn devices_get_their_colour_class() {
        assert_eq!(pool_class("cuda:1"), "gpu");
        assert_eq!(pool_class("cpu"), "cpu");
        assert_eq!(device_class(&Device::DISK), "disk");
    }
}
