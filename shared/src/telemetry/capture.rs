//! An in-memory stdout for tests: the log subscriber writes its lines here (as a
//! [`MakeWriter`]) and [`Emf`](super::metrics::Emf) its metric lines (as [`MetricLines`]),
//! in the order they were printed, as a function's stdout would hold them.

use super::emf::MetricLines;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use tracing_subscriber::fmt::MakeWriter;

/// Everything printed so far. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn bytes(&self) -> MutexGuard<'_, Vec<u8>> {
        // A writer never panics while holding the lock.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.bytes()).lines().map(str::to_owned).collect()
    }
}

/// One writer the log subscriber takes per line.
pub struct CaptureWriter(Capture);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.bytes().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = CaptureWriter;

    fn make_writer(&'a self) -> CaptureWriter {
        CaptureWriter(self.clone())
    }
}

impl MetricLines for Capture {
    fn write_line(&self, line: &str) {
        let mut bytes = self.bytes();
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
}
