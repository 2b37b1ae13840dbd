//! The shipped packaging: the units' hardening stays within its budget, the monitoring kit names
//! only metrics the daemon exports, and what scripts/package.sh relies on in the example config.

use std::collections::BTreeSet;
use std::process::Command;

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `systemd-analyze security` of a unit file, as the exposure number it prints.
fn exposure(unit: &str) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(unit);
    std::fs::write(
        &path,
        repo_file(&format!("dist/{unit}")).replace(
            "/usr/bin/synapse-s3-offload",
            env!("CARGO_BIN_EXE_synapse-s3-offload"),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) is needed for this test");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    line.split(": ")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the level in {line:?}"))
}

#[test]
fn the_units_exposure_is_at_most_1_5() {
    for unit in [
        "synapse-s3-offload.service",
        "synapse-s3-offload-audit.service",
    ] {
        let level = exposure(unit);
        assert!(level <= 1.5, "{unit}: exposure {level} (budget 1.5)");
    }
}

/// Every `synapse_s3_offload_*` name in the alert rules and the dashboard is one that
/// src/metrics.rs defines (a histogram's `_bucket`/`_sum`/`_count` series count as its name).
#[test]
fn the_monitoring_kit_names_only_exported_metrics() {
    let names = |text: &str| -> BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("synapse_s3_offload_"))
            .map(str::to_owned)
            .collect()
    };
    let src = repo_file("src/metrics.rs");
    let defined: BTreeSet<String> = src
        .lines()
        .filter(|l| l.starts_with("pub const "))
        .flat_map(names)
        .collect();
    assert!(
        defined.len() > 10,
        "metric names in src/metrics.rs: {defined:?}"
    );
    for file in [
        "dist/monitoring/alerts.yml",
        "dist/monitoring/alerts.test.yml",
        "dist/monitoring/grafana-dashboard.json",
    ] {
        for name in names(&repo_file(file)) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| defined.contains(*b)))
                .unwrap_or(&name);
            assert!(
                defined.contains(base),
                "{file} uses {name}, which src/metrics.rs does not define"
            );
        }
    }
}

#[test]
fn the_example_has_the_conf_d_line_the_debian_config_uncomments() {
    // scripts/package.sh makes the .deb's conffile from the example by uncommenting this line.
    assert!(
        repo_file("config/example.yaml")
            .lines()
            .any(|l| l.starts_with("# synapse_config_dir: /etc/matrix-synapse/conf.d ")),
        "scripts/package.sh uncomments `# synapse_config_dir: /etc/matrix-synapse/conf.d` in config/example.yaml"
    );
}
