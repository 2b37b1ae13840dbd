//! The effective setup in one line, for the daemon's startup log: where files go, what runs when.
//! Never a secret (only whether credentials are static or come from the AWS chain).

use super::Config;

impl Config {
    pub fn summary(&self) -> String {
        let s3 = &self.s3;
        let credentials = if s3.access_key_id.is_some() {
            "static keys"
        } else {
            "AWS credential chain"
        };
        let sweep = match &self.database {
            _ if !self.sweep.enabled => "off (sweep.enabled: false)".to_string(),
            None => "off (no database: section)".to_string(),
            Some(db) => format!(
                "{}every {}, keeping media accessed in the last {} (Synapse's {})",
                if self.sweep.dry_run { "dry run " } else { "" },
                humantime::format_duration(self.sweep.interval),
                humantime::format_duration(self.sweep.keep_local_for),
                db.kind()
            ),
        };
        format!(
            "media store {}, bucket {} (prefix {:?}) at {}, {credentials}, state in {}, metrics {}, full scan every {}, sweep {sweep}",
            self.media_store_path.display(),
            s3.bucket,
            s3.prefix,
            s3.endpoint_url.as_deref().unwrap_or("AWS S3"),
            self.state_dir.display(),
            match self.metrics.listen {
                Some(a) => format!("on http://{a}/metrics"),
                None => "off".into(),
            },
            humantime::format_duration(self.scan_interval),
        )
    }
}
