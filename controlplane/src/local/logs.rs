//! Output capture for local instances. Both streams of an instance go to one log file, each line
//! prefixed with an RFC 3339 UTC timestamp and the stream name
//! (`2026-12-04T21:00:00.123Z stdout hello`). The last lines are also kept in memory for failure
//! messages.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{ChildStderr, ChildStdout};
use tokio::task::JoinHandle;

/// Number of output lines, from both streams, kept in memory for failure messages.
pub(super) const TAIL_LINES: usize = 20;

/// Maximum length of one logged line in bytes. Longer lines are split into pieces of this size,
/// so a process that never writes a newline cannot make the capture buffer grow without bound.
pub(super) const MAX_LINE_BYTES: usize = 16 * 1024;

const READ_CHUNK_BYTES: usize = 8 * 1024;

/// The last lines an instance wrote to stdout or stderr, oldest first.
#[derive(Debug, Default)]
pub(super) struct OutputTail {
    lines: Mutex<VecDeque<String>>,
}

impl OutputTail {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock();
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// Returns the kept lines joined with newlines.
    pub(super) fn text(&self) -> String {
        let lines = self.lines.lock();
        let mut text = String::new();
        for (index, line) in lines.iter().enumerate() {
            if index > 0 {
                text.push('\n');
            }
            text.push_str(line);
        }
        text
    }
}

/// Opens (appending) the log file at `path`, creating its directories.
///
/// Appending keeps an earlier log when instance ids repeat after a control plane restart.
pub(super) async fn open_log_file(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

/// Spawns the task that copies the child's stdout and stderr into `file` and `tail`.
///
/// The task ends once both pipes are closed, which happens when every process holding them has
/// exited, and the log file is flushed by then.
pub(super) fn spawn_capture(
    stdout: ChildStdout,
    stderr: ChildStderr,
    file: File,
    log_path: PathBuf,
    tail: Arc<OutputTail>,
) -> JoinHandle<()> {
    let log = LogWriter {
        file,
        path: log_path,
        failed: false,
    };
    tokio::spawn(capture(
        CapturedStream::new("stdout", stdout),
        CapturedStream::new("stderr", stderr),
        log,
        tail,
    ))
}

async fn capture(
    mut stdout: CapturedStream<ChildStdout>,
    mut stderr: CapturedStream<ChildStderr>,
    mut log: LogWriter,
    tail: Arc<OutputTail>,
) {
    let mut formatted = Vec::new();
    while stdout.open || stderr.open {
        formatted.clear();
        // `read` is cancel safe, so the branch that loses the race has read nothing.
        tokio::select! {
            result = stdout.reader.read(&mut stdout.buffer), if stdout.open => {
                stdout.process(result, &mut formatted, &tail);
            }
            result = stderr.reader.read(&mut stderr.buffer), if stderr.open => {
                stderr.process(result, &mut formatted, &tail);
            }
        }
        log.write(&formatted).await;
    }
    log.flush().await;
}

struct CapturedStream<R> {
    name: &'static str,
    reader: R,
    buffer: Vec<u8>,
    lines: LineSplitter,
    open: bool,
}

impl<R> CapturedStream<R> {
    fn new(name: &'static str, reader: R) -> Self {
        Self {
            name,
            reader,
            buffer: vec![0; READ_CHUNK_BYTES],
            lines: LineSplitter::default(),
            open: true,
        }
    }
}

impl<R: AsyncRead + Unpin> CapturedStream<R> {
    /// Appends the lines of one read result to the formatted log output and to the tail.
    fn process(&mut self, result: io::Result<usize>, formatted: &mut Vec<u8>, tail: &OutputTail) {
        // All lines of one chunk arrived together, so they share one timestamp.
        let timestamp = format_timestamp(SystemTime::now());
        let name = self.name;
        let mut emit = |line: &[u8]| {
            let text = String::from_utf8_lossy(line);
            append_log_line(formatted, &timestamp, name, &text);
            tail.push(text.into_owned());
        };
        match result {
            Ok(count) if count > 0 => self.lines.push(&self.buffer[..count], &mut emit),
            // End of file, or a read error that leaves nothing more to read.
            _ => {
                self.open = false;
                self.lines.finish(&mut emit);
            }
        }
    }
}

/// The log file of one instance. After a write error, which is logged once, output is still
/// read from the pipes, so the process does not stall on a full pipe, but no longer written.
struct LogWriter {
    file: File,
    path: PathBuf,
    failed: bool,
}

impl LogWriter {
    async fn write(&mut self, bytes: &[u8]) {
        if self.failed || bytes.is_empty() {
            return;
        }
        if let Err(error) = self.file.write_all(bytes).await {
            self.report(error);
        }
    }

    async fn flush(&mut self) {
        if self.failed {
            return;
        }
        if let Err(error) = self.file.flush().await {
            self.report(error);
        }
    }

    fn report(&mut self, error: io::Error) {
        self.failed = true;
        tracing::warn!(
            path = %self.path.display(),
            %error,
            "failed to write instance log; further output of this instance is discarded"
        );
    }
}

fn append_log_line(formatted: &mut Vec<u8>, timestamp: &str, stream: &str, line: &str) {
    formatted.extend_from_slice(timestamp.as_bytes());
    formatted.push(b' ');
    formatted.extend_from_slice(stream.as_bytes());
    formatted.push(b' ');
    formatted.extend_from_slice(line.as_bytes());
    formatted.push(b'\n');
}

/// Splits a byte stream into lines without their `\n` or `\r\n` ending. A line longer than
/// [`MAX_LINE_BYTES`] is emitted in pieces of that size.
#[derive(Debug, Default)]
pub(super) struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    /// Emits every line that `chunk` completes and keeps the unfinished rest.
    pub(super) fn push(&mut self, chunk: &[u8], emit: &mut impl FnMut(&[u8])) {
        for segment in chunk.split_inclusive(|&byte| byte == b'\n') {
            let (body, ends_line) = match segment.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (segment, false),
            };
            self.partial.extend_from_slice(body);
            while self.partial.len() > MAX_LINE_BYTES {
                emit(&self.partial[..MAX_LINE_BYTES]);
                self.partial.drain(..MAX_LINE_BYTES);
            }
            if ends_line {
                emit(strip_carriage_return(&self.partial));
                self.partial.clear();
            }
        }
    }

    /// Emits the unfinished last line, if any, at the end of the stream.
    pub(super) fn finish(&mut self, emit: &mut impl FnMut(&[u8])) {
        if !self.partial.is_empty() {
            emit(strip_carriage_return(&self.partial));
            self.partial.clear();
        }
    }
}

fn strip_carriage_return(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Formats `time` as RFC 3339 in UTC with milliseconds, e.g. `2026-12-04T21:00:00.123Z`.
/// Times before 1970 are formatted as the epoch.
pub(super) fn format_timestamp(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    // u64 seconds / 86_400 is below 2^47, so it fits in i64.
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3_600,
        second_of_day % 3_600 / 60,
        second_of_day % 60,
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day).
///
/// Counts from 0000-03-01 so that the leap day ends each 400-year era and each year, which
/// makes the month lengths from March on follow the `(153 * month + 2) / 5` pattern. This is
/// Howard Hinnant's `civil_from_days` (https://howardhinnant.github.io/date_algorithms.html).
fn civil_from_days(days_since_epoch: i64) -> (i64, u32, u32) {
    let days = days_since_epoch + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    // day is in 1..=31 and month in 1..=12, so both fit in u32.
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at_millis(millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(millis)
    }

    fn split_all(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        let mut emit = |line: &[u8]| lines.push(line.to_vec());
        for chunk in chunks {
            splitter.push(chunk, &mut emit);
        }
        splitter.finish(&mut emit);
        lines
    }

    #[test]
    fn local_timestamp_known_dates() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (1_000_982_123, "1970-01-12T14:03:02.123Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_709_164_800_123, "2024-02-29T00:00:00.123Z"),
            (1_798_405_200_999, "2026-12-27T21:00:00.999Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
        ];
        for (millis, expected) in cases {
            assert_eq!(format_timestamp(at_millis(millis)), expected, "{millis} ms");
        }
    }

    #[test]
    fn local_timestamp_before_epoch_is_epoch() {
        let before = UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(format_timestamp(before), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn local_civil_from_days_matches_day_count() {
        // Walk every day from 1900-01-01 to 2199-12-25 and check that dates advance one day at a time.
        let mut previous = civil_from_days(-25_567);
        assert_eq!(previous, (1900, 1, 1));
        for days in -25_566..84_000 {
            let current = civil_from_days(days);
            let next_in_month = (previous.0, previous.1, previous.2 + 1);
            let next_month = if previous.1 == 12 {
                (previous.0 + 1, 1, 1)
            } else {
                (previous.0, previous.1 + 1, 1)
            };
            assert!(
                current == next_in_month || current == next_month,
                "{days}: {previous:?} -> {current:?}"
            );
            previous = current;
        }
    }

    #[test]
    fn local_lines_split_across_chunks() {
        let lines = split_all(&[b"hel", b"lo\nwor", b"ld\r\n\nlast"]);
        let expected: Vec<&[u8]> = vec![b"hello", b"world", b"", b"last"];
        assert_eq!(lines, expected);
    }

    #[test]
    fn local_long_line_is_split_into_pieces() {
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        let chunks: Vec<&[u8]> = input.chunks(READ_CHUNK_BYTES).collect();

        let lines = split_all(&chunks);

        assert_eq!(
            lines.len(),
            4,
            "{:?}",
            lines.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
        assert_eq!(lines[1].len(), MAX_LINE_BYTES);
        assert_eq!(lines[2].len(), 10);
        assert_eq!(lines[3], b"next");
    }

    #[test]
    fn local_line_of_exactly_max_length_stays_whole() {
        let mut input = vec![b'y'; MAX_LINE_BYTES];
        input.push(b'\n');
        let lines = split_all(&[&input]);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
    }

    #[test]
    fn local_tail_keeps_last_lines() {
        let tail = OutputTail::default();
        for index in 0..TAIL_LINES + 5 {
            tail.push(format!("line {index}"));
        }
        let text = tail.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 5");
        assert_eq!(lines[TAIL_LINES - 1], format!("line {}", TAIL_LINES + 4));
    }
}
