//! A progress bar on a terminal, nothing otherwise.

use std::io::IsTerminal;

use cairn_vault::imager::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// Shows progress on stderr when it is a terminal and `--json` was not asked for.
pub struct Bar(Option<ProgressBar>);

impl Bar {
    pub fn new(what: &str, quiet: bool) -> Self {
        if quiet || !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        Self(Some(b))
    }

    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn update(&self, done: u64, total: u64) {
        if let Some(b) = &self.0 {
            b.set_length(total);
            b.set_position(done);
        }
    }
}
