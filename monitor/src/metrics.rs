//! Prometheus text exposition of the daemon's counters (`monitor_` prefix), rendered from
//! snapshots the capture loop takes once a second; served by `--metrics-addr`.

use std::fmt::Write;

/// One metric family: name, type, help, and samples (labels, value).
pub struct Family {
    name: String,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    pub fn counter(name: &str, help: &'static str) -> Self {
        Family {
            name: format!("monitor_{name}"),
            kind: "counter",
            help,
            samples: Vec::new(),
        }
    }

    pub fn gauge(name: &str, help: &'static str) -> Self {
        Family {
            name: format!("monitor_{name}"),
            kind: "gauge",
            help,
            samples: Vec::new(),
        }
    }

    pub fn sample(mut self, labels: &[(&'static str, &str)], value: f64) -> Self {
        self.samples.push((
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        ));
        self
    }

    pub fn push(&mut self, labels: &[(&'static str, &str)], value: f64) {
        self.samples.push((
            labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        ));
    }
}

/// Label values escaped as the exposition format requires.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        let name = if f.kind == "counter" {
            format!("{}_total", f.name)
        } else {
            f.name.clone()
        };
        for (labels, v) in &f.samples {
            let l: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            if l.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{}}} {v}", l.join(","));
            }
        }
    }
    out
}

/// Adds every numeric field of a JSON object (flattened with `_`) as gauges or counters:
/// the stats structs of the pipeline, detector, notifier and sink are serialisable.
pub fn from_json(prefix: &str, v: &serde_json::Value, out: &mut Vec<Family>) {
    fn walk(path: String, v: &serde_json::Value, out: &mut Vec<Family>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key: String = k
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    walk(format!("{path}_{key}"), v, out);
                }
            }
            serde_json::Value::Number(n) => {
                if let Some(f) = n.as_f64() {
                    out.push(
                        Family::gauge(&path, "internal counter (see the README's metrics table)")
                            .sample(&[], f),
                    );
                }
            }
            serde_json::Value::Bool(b) => {
                out.push(Family::gauge(&path, "internal flag").sample(&[], *b as u8 as f64))
            }
            _ => {}
        }
    }
    walk(prefix.to_string(), v, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_format() {
        let text = render(&[
            Family::counter("events", "events received").sample(&[("program", "ssl_write")], 3.0),
            Family::gauge("ready", "probes attached").sample(&[], 1.0),
        ]);
        assert!(
            text.contains(
                "# TYPE monitor_events counter\nmonitor_events_total{program=\"ssl_write\"} 3\n"
            ),
            "{text}"
        );
        assert!(text.contains("monitor_ready 1\n"));
        let mut fams = Vec::new();
        from_json(
            "pipeline",
            &serde_json::json!({"requests": 5, "sub": {"x-y": 2}}),
            &mut fams,
        );
        let text = render(&fams);
        assert!(
            text.contains("monitor_pipeline_requests 5")
                && text.contains("monitor_pipeline_sub_x_y 2"),
            "{text}"
        );
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}
