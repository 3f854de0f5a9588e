//! The checks of a loaded configuration that its types cannot express: ranges, files that go
//! together, listeners that clash. Each error names the setting ([`ConfigError::Invalid`]).

use std::collections::BTreeSet;

use super::{ConfigError, Settings};

impl Settings {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| {
            Err(ConfigError::Invalid {
                name,
                message: message.to_string(),
            })
        };
        if self.storage.partitions == 0 || self.storage.partitions > 4096 {
            return invalid("storage.partitions", "must be between 1 and 4096");
        }
        if self.mqtt.max_packet_size < 64 {
            return invalid("mqtt.max_packet_size", "must be at least 64 bytes");
        }
        if self.mqtt.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum", "must be at least 1");
        }
        if self.mqtt.v311_inflight == 0 {
            return invalid("mqtt.v311_inflight", "must be at least 1");
        }
        if self.mqtt.maximum_qos > 2 {
            return invalid("mqtt.maximum_qos", "must be 0, 1 or 2");
        }
        if self.session.max_queued_messages == 0 {
            return invalid("session.max_queued_messages", "must be at least 1");
        }
        if self.limits.max_topic_length == 0 || self.limits.max_topic_levels == 0 {
            return invalid(
                "limits.max_topic_length",
                "max_topic_length and max_topic_levels must be at least 1",
            );
        }
        self.metrics.listen()?;
        if self.metrics.probe_interval_secs > 0 && self.metrics.probe_timeout_secs == 0 {
            return invalid("metrics.probe_timeout_secs", "must be at least 1");
        }
        self.cluster.tls_files()?;
        self.validate_listeners()?;
        Ok(())
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let listeners = self.effective_listeners();
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, l) in listeners.iter().enumerate() {
            l.check(i)?;
            if !names.insert(l.name()) {
                return Err(ConfigError::Invalid {
                    name: "listeners",
                    message: format!("two listeners are named `{}`", l.name()),
                });
            }
            if l.listen.port() != 0 && !addrs.insert(l.listen) {
                return Err(ConfigError::Invalid {
                    name: "listeners",
                    message: format!("two listeners on {}", l.listen),
                });
            }
        }
        Ok(())
    }
}
