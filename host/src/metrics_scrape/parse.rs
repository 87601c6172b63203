//! The Prometheus text exposition format (version 0.0.4) parsed into flat samples.
//!
//! It owns the grammar: comments (`# HELP`, `# TYPE`, others ignored), metric and label
//! names, label values with their escapes, sample values (`NaN`, `±Inf`, exponents) and
//! optional millisecond timestamps; lines end in LF or CRLF. It is pure and strict: any
//! malformed line fails the whole page with that line's number, because a page that is
//! only half understood must not pass for a good one. It knows nothing about vLLM; which
//! samples matter is `extract`'s business, and the page size cap is the fetcher's.
//!
//! No crate is used: the maintained Prometheus crates export metrics but do not parse them,
//! and the available parsers either skip lines they do not understand (which would let
//! garbage through half-read) or build a metric-family tree we would immediately flatten.

/// One line of a page: a value of one series.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// In page order; names are unique within a sample.
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Why a page was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    /// `line` counts from 1.
    #[error("line {line}: {error}")]
    Line { line: usize, error: LineError },
    #[error("the page is not UTF-8 (invalid byte at offset {offset})")]
    NotUtf8 { offset: usize },
}

/// What is wrong with one line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    #[error("expected {expected}, found {found}")]
    Syntax { expected: &'static str, found: String },
    #[error("label `{0}` appears twice")]
    DuplicateLabel(String),
    #[error("invalid escape `\\{escape}` in the value of label `{label}`")]
    Escape { label: String, escape: char },
    #[error("the value of label `{0}` is not closed")]
    UnclosedValue(String),
    #[error("`{0}` is not a number")]
    Value(String),
    #[error("`{0}` is not a timestamp in milliseconds")]
    Timestamp(String),
    #[error("`{0}` is not a metric type")]
    Type(String),
    #[error("the page ends without a line feed (truncated?)")]
    NoFinalNewline,
}

/// The metric types a `# TYPE` line may name: the text format's, plus OpenMetrics' so that
/// an exporter answering in a newer dialect is not rejected for a type we never read.
const METRIC_TYPES: &[&str] =
    &["counter", "gauge", "histogram", "summary", "untyped", "unknown", "info", "stateset", "gaugehistogram"];

/// Error texts quote at most this many characters of the offending input, so a garbage page
/// cannot produce a megabyte-long log line.
const QUOTE_CHARS: usize = 32;

/// Parses a page given as bytes: it must be UTF-8, then as `parse`.
pub fn parse_bytes(page: &[u8]) -> Result<Vec<Sample>, ParseError> {
    let text = std::str::from_utf8(page).map_err(|e| ParseError::NotUtf8 { offset: e.valid_up_to() })?;
    parse(text)
}

/// Parses a whole page; all its samples in page order, or the first malformed line.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, piece) in text.split_inclusive('\n').enumerate() {
        let line = index + 1;
        let fail = |error| ParseError::Line { line, error };
        // The format requires every line, the last included, to end with a line feed; a page
        // cut short by a dropped connection or a proxy usually shows as a missing one.
        let Some(content) = piece.strip_suffix('\n') else {
            if piece.trim_matches([' ', '\t']).is_empty() {
                break;
            }
            return Err(fail(LineError::NoFinalNewline));
        };
        let content = content.strip_suffix('\r').unwrap_or(content);
        if let Some(sample) = parse_line(content).map_err(fail)? {
            samples.push(sample);
        }
    }
    Ok(samples)
}

/// One line without its line ending: a sample, or `None` for blank and comment lines.
fn parse_line(line: &str) -> Result<Option<Sample>, LineError> {
    let mut c = Cursor { line, pos: 0 };
    c.skip_blanks();
    match c.peek() {
        None => Ok(None),
        Some(b'#') => {
            c.pos += 1;
            comment(&mut c)?;
            Ok(None)
        }
        Some(_) => sample(&mut c).map(Some),
    }
}

/// Checks `HELP` and `TYPE` lines (a wrong one means the page is not what it claims to be);
/// any other comment is free text.
fn comment(c: &mut Cursor<'_>) -> Result<(), LineError> {
    c.skip_blanks();
    let keyword = c.take_while(|b| !is_blank(b));
    if keyword != "HELP" && keyword != "TYPE" {
        return Ok(());
    }
    c.skip_blanks();
    if c.metric_name().is_none() || !c.at_blank_or_end() {
        return Err(c.syntax("a metric name"));
    }
    if keyword == "HELP" {
        // The docstring is free text; we never read it.
        return Ok(());
    }
    c.skip_blanks();
    let kind = c.take_while(|b| !is_blank(b));
    if kind.is_empty() {
        return Err(c.syntax("a metric type"));
    }
    if !METRIC_TYPES.contains(&kind) {
        return Err(LineError::Type(quote(kind)));
    }
    c.skip_blanks();
    if !c.at_end() {
        return Err(c.syntax("the end of the line"));
    }
    Ok(())
}

/// `name [{labels}] value [timestamp]`, blanks between tokens.
fn sample(c: &mut Cursor<'_>) -> Result<Sample, LineError> {
    let Some(name) = c.metric_name() else {
        return Err(c.syntax("a metric name"));
    };
    let name = name.to_string();
    let after_name = c.pos;
    c.skip_blanks();
    let labels = if c.peek() == Some(b'{') {
        c.pos += 1;
        labels(c)?
    } else if c.pos == after_name && !c.at_end() {
        // Something glued to the name (`foo-bar 1`): the name itself is malformed.
        return Err(c.syntax("`{` or a blank after the metric name"));
    } else {
        Vec::new()
    };
    c.skip_blanks();
    let token = c.take_while(|b| !is_blank(b));
    if token.is_empty() {
        return Err(c.syntax("a sample value"));
    }
    // Rust's float syntax is the format's (Go's) for everything an exporter writes: `NaN`,
    // `+Inf`, `-Inf` (case-insensitive), exponents, a leading `+`.
    let value = token.parse::<f64>().map_err(|_| LineError::Value(quote(token)))?;
    c.skip_blanks();
    let timestamp_ms = if c.at_end() {
        None
    } else {
        let token = c.take_while(|b| !is_blank(b));
        Some(token.parse::<i64>().map_err(|_| LineError::Timestamp(quote(token)))?)
    };
    c.skip_blanks();
    if !c.at_end() {
        return Err(c.syntax("the end of the line"));
    }
    Ok(Sample { name, labels, value, timestamp_ms })
}

/// The label set after its `{`, through its `}`. A trailing comma is allowed, as in the
/// format; duplicate label names are not.
fn labels(c: &mut Cursor<'_>) -> Result<Vec<(String, String)>, LineError> {
    let mut labels: Vec<(String, String)> = Vec::new();
    loop {
        c.skip_blanks();
        if c.peek() == Some(b'}') {
            c.pos += 1;
            return Ok(labels);
        }
        let Some(name) = c.label_name() else {
            return Err(c.syntax("a label name or `}`"));
        };
        c.skip_blanks();
        if c.peek() != Some(b'=') {
            return Err(c.syntax("`=`"));
        }
        c.pos += 1;
        c.skip_blanks();
        if c.peek() != Some(b'"') {
            return Err(c.syntax("`\"`"));
        }
        c.pos += 1;
        let value = label_value(c, name)?;
        if labels.iter().any(|(n, _)| n == name) {
            return Err(LineError::DuplicateLabel(name.to_string()));
        }
        labels.push((name.to_string(), value));
        c.skip_blanks();
        match c.peek() {
            Some(b',') => c.pos += 1,
            Some(b'}') => {
                c.pos += 1;
                return Ok(labels);
            }
            _ => return Err(c.syntax("`,` or `}`")),
        }
    }
}

/// A label value after its opening quote, through the closing one, unescaped.
fn label_value(c: &mut Cursor<'_>, label: &str) -> Result<String, LineError> {
    let mut value = String::new();
    let mut start = c.pos;
    // Scanning bytes is sound for UTF-8: the bytes of a multi-byte character are never `"`
    // or `\`, so every slice below starts and ends on a character boundary.
    loop {
        match c.peek() {
            None => return Err(LineError::UnclosedValue(label.to_string())),
            Some(b'"') => {
                value.push_str(&c.line[start..c.pos]);
                c.pos += 1;
                return Ok(value);
            }
            Some(b'\\') => {
                value.push_str(&c.line[start..c.pos]);
                c.pos += 1;
                let escaped = match c.line[c.pos..].chars().next() {
                    Some('\\') => '\\',
                    Some('"') => '"',
                    Some('n') => '\n',
                    Some(other) => return Err(LineError::Escape { label: label.to_string(), escape: other }),
                    None => return Err(LineError::UnclosedValue(label.to_string())),
                };
                value.push(escaped);
                c.pos += 1;
                start = c.pos;
            }
            Some(_) => c.pos += 1,
        }
    }
}

/// A position in one line.
struct Cursor<'a> {
    line: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.line.as_bytes().get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.line.len()
    }

    fn at_blank_or_end(&self) -> bool {
        self.peek().is_none_or(is_blank)
    }

    fn skip_blanks(&mut self) {
        self.take_while(is_blank);
    }

    /// The longest run from here of bytes matching `keep`. `keep` must reject every
    /// non-ASCII byte or accept all of them, so the run ends on a character boundary.
    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a str {
        let start = self.pos;
        let bytes = self.line.as_bytes();
        while self.pos < bytes.len() && keep(bytes[self.pos]) {
            self.pos += 1;
        }
        &self.line[start..self.pos]
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`; colons are legal (vLLM's names all start with `vllm:`).
    fn metric_name(&mut self) -> Option<&'a str> {
        let first = self.peek()?;
        if !(first.is_ascii_alphabetic() || first == b'_' || first == b':') {
            return None;
        }
        Some(self.take_while(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'))
    }

    /// `[a-zA-Z_][a-zA-Z0-9_]*`.
    fn label_name(&mut self) -> Option<&'a str> {
        let first = self.peek()?;
        if !(first.is_ascii_alphabetic() || first == b'_') {
            return None;
        }
        Some(self.take_while(|b| b.is_ascii_alphanumeric() || b == b'_'))
    }

    fn syntax(&self, expected: &'static str) -> LineError {
        let rest = self.line.get(self.pos..).unwrap_or_default();
        let found = if rest.is_empty() { "the end of the line".to_string() } else { format!("`{}`", quote(rest)) };
        LineError::Syntax { expected, found }
    }
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// At most `QUOTE_CHARS` characters of `text`, marked when cut.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64, timestamp_ms: Option<i64>) -> Sample {
        Sample {
            name: name.to_string(),
            labels: labels.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            value,
            timestamp_ms,
        }
    }

    /// Samples compare with NaN equal to NaN, so NaN values can sit in the tables.
    fn same(a: &Sample, b: &Sample) -> bool {
        let value = a.value == b.value || (a.value.is_nan() && b.value.is_nan());
        a.name == b.name && a.labels == b.labels && value && a.timestamp_ms == b.timestamp_ms
    }

    #[test]
    fn good_lines() {
        let cases: &[(&str, Option<Sample>)] = &[
            ("", None),
            ("   \t ", None),
            ("# a free comment { with \" junk", None),
            ("#", None),
            ("# HELP vllm:num_requests_waiting Number of requests waiting to be processed.", None),
            ("# HELP x", None),
            ("# HELP x docstring with \\n and \\\\ escapes", None),
            ("# TYPE vllm:kv_cache_usage_perc gauge", None),
            ("#  TYPE  http_requests  counter  ", None),
            ("# TYPE h histogram", None),
            ("# TYPE s summary", None),
            ("# TYPE u untyped", None),
            ("# EOF", None),
            ("up 1", Some(sample("up", &[], 1.0, None))),
            ("  up 1  ", Some(sample("up", &[], 1.0, None))),
            ("up\t1", Some(sample("up", &[], 1.0, None))),
            ("vllm:num_requests_running 12.0", Some(sample("vllm:num_requests_running", &[], 12.0, None))),
            (":weird:name_ 1", Some(sample(":weird:name_", &[], 1.0, None))),
            ("up{} 1", Some(sample("up", &[], 1.0, None))),
            ("up { } 1", Some(sample("up", &[], 1.0, None))),
            ("up{}1", Some(sample("up", &[], 1.0, None))),
            (
                r#"vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct",engine="0"} 3.0"#,
                Some(sample(
                    "vllm:num_requests_waiting",
                    &[("model_name", "meta-llama/Llama-3.1-8B-Instruct"), ("engine", "0")],
                    3.0,
                    None,
                )),
            ),
            (r#"m{a="1",} 2"#, Some(sample("m", &[("a", "1")], 2.0, None))),
            (r#"m{ a = "1" , b="2" , } 2"#, Some(sample("m", &[("a", "1"), ("b", "2")], 2.0, None))),
            (r#"m{a=""} 0"#, Some(sample("m", &[("a", "")], 0.0, None))),
            (r#"m{a="x\\y"} 0"#, Some(sample("m", &[("a", "x\\y")], 0.0, None))),
            (r#"m{a="say \"hi\""} 0"#, Some(sample("m", &[("a", "say \"hi\"")], 0.0, None))),
            (r#"m{a="two\nlines"} 0"#, Some(sample("m", &[("a", "two\nlines")], 0.0, None))),
            (r#"m{a="\\n"} 0"#, Some(sample("m", &[("a", "\\n")], 0.0, None))),
            (r#"m{a="{},= #"} 0"#, Some(sample("m", &[("a", "{},= #")], 0.0, None))),
            (r#"m{a="ünïcødé 💥"} 0"#, Some(sample("m", &[("a", "ünïcødé 💥")], 0.0, None))),
            (r#"m{_a1="x"} 0"#, Some(sample("m", &[("_a1", "x")], 0.0, None))),
            ("m NaN", Some(sample("m", &[], f64::NAN, None))),
            ("m nan", Some(sample("m", &[], f64::NAN, None))),
            ("m +Inf", Some(sample("m", &[], f64::INFINITY, None))),
            ("m -Inf", Some(sample("m", &[], f64::NEG_INFINITY, None))),
            ("m inf", Some(sample("m", &[], f64::INFINITY, None))),
            ("m -0.5", Some(sample("m", &[], -0.5, None))),
            ("m +3", Some(sample("m", &[], 3.0, None))),
            ("m .5", Some(sample("m", &[], 0.5, None))),
            ("m 1.7543285412e+09", Some(sample("m", &[], 1.7543285412e9, None))),
            ("m 4.6231601152e+010", Some(sample("m", &[], 4.6231601152e10, None))),
            ("m 1E-3", Some(sample("m", &[], 0.001, None))),
            ("m 1 1700000000000", Some(sample("m", &[], 1.0, Some(1_700_000_000_000)))),
            ("m 1 -5", Some(sample("m", &[], 1.0, Some(-5)))),
            ("m{a=\"b\"} 1 0 ", Some(sample("m", &[("a", "b")], 1.0, Some(0)))),
        ];
        for (line, expected) in cases {
            let got = parse_line(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            match (&got, expected) {
                (None, None) => {}
                (Some(g), Some(e)) if same(g, e) => {}
                _ => panic!("{line:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn bad_lines() {
        let syntax = |expected, found: &str| LineError::Syntax { expected, found: found.to_string() };
        let end = "the end of the line";
        let cases: &[(&str, LineError)] = &[
            ("1up 1", syntax("a metric name", "`1up 1`")),
            ("foo-bar 1", syntax("`{` or a blank after the metric name", "`-bar 1`")),
            ("up", syntax("a sample value", end)),
            ("up   ", syntax("a sample value", end)),
            ("up{}", syntax("a sample value", end)),
            ("up one", LineError::Value("one".into())),
            ("up 0x10", LineError::Value("0x10".into())),
            ("up 1,5", LineError::Value("1,5".into())),
            ("up 1 1.5", LineError::Timestamp("1.5".into())),
            ("up 1 now", LineError::Timestamp("now".into())),
            ("up 1 2 3", syntax(end, "`3`")),
            ("up{", syntax("a label name or `}`", end)),
            ("up{,} 1", syntax("a label name or `}`", "`,} 1`")),
            (r#"up{a="1",,} 1"#, syntax("a label name or `}`", "`,} 1`")),
            (r#"up{1a="1"} 1"#, syntax("a label name or `}`", r#"`1a="1"} 1`"#)),
            (r#"up{a:b="1"} 1"#, syntax("`=`", r#"`:b="1"} 1`"#)),
            (r#"up{a} 1"#, syntax("`=`", "`} 1`")),
            (r#"up{a=1} 1"#, syntax("`\"`", "`1} 1`")),
            (r#"up{a="1" b="2"} 1"#, syntax("`,` or `}`", r#"`b="2"} 1`"#)),
            (r#"up{a="1"} "#, syntax("a sample value", end)),
            (r#"up{a="1""#, syntax("`,` or `}`", end)),
            (r#"up{a="1"#, LineError::UnclosedValue("a".into())),
            (r#"up{a="1\"} 1"#, LineError::UnclosedValue("a".into())),
            (r#"up{a="1\"#, LineError::UnclosedValue("a".into())),
            (r#"up{a="\t"} 1"#, LineError::Escape { label: "a".into(), escape: 't' }),
            (r#"up{a="\é"} 1"#, LineError::Escape { label: "a".into(), escape: 'é' }),
            (r#"up{a="1",a="2"} 1"#, LineError::DuplicateLabel("a".into())),
            ("{} 1", syntax("a metric name", "`{} 1`")),
            (
                "<html><body>502 Bad Gateway</body></html>",
                syntax("a metric name", "`<html><body>502 Bad Gateway</bod…`"),
            ),
            ("# HELP", syntax("a metric name", end)),
            ("# HELP 1x docs", syntax("a metric name", "`1x docs`")),
            ("# HELP x{y} docs", syntax("a metric name", "`{y} docs`")),
            ("# TYPE", syntax("a metric name", end)),
            ("# TYPE x", syntax("a metric type", end)),
            ("# TYPE x Gauge", LineError::Type("Gauge".into())),
            ("# TYPE x meter", LineError::Type("meter".into())),
            ("# TYPE x gauge extra", syntax(end, "`extra`")),
        ];
        for (line, expected) in cases {
            match parse_line(line) {
                Err(e) => assert_eq!(&e, expected, "{line:?}"),
                Ok(s) => panic!("{line:?}: accepted as {s:?}, expected {expected}"),
            }
        }
    }

    #[test]
    fn pages() {
        let ok = |samples: usize| -> Result<usize, ParseError> { Ok(samples) };
        let at = |line, error| -> Result<usize, ParseError> { Err(ParseError::Line { line, error }) };
        let cases: &[(&str, Result<usize, ParseError>)] = &[
            ("", ok(0)),
            ("\n\n", ok(0)),
            ("a 1\nb 2\n", ok(2)),
            ("a 1\r\nb 2\r\n", ok(2)),
            ("# HELP a x\r\n# TYPE a gauge\r\n\r\na 1\r\n", ok(1)),
            ("a 1\nb 2\n  ", ok(2)),
            ("a 1\nb 2", at(2, LineError::NoFinalNewline)),
            ("a 1\nb{x=\"", at(2, LineError::NoFinalNewline)),
            ("a 1\n\nb x\nc 3\n", at(3, LineError::Value("x".into()))),
            ("a 1\r\r\n", at(1, LineError::Value("1\r".into()))),
        ];
        for (page, expected) in cases {
            assert_eq!(&parse(page).map(|s| s.len()), expected, "{page:?}");
        }
    }

    #[test]
    fn bytes_must_be_utf8() {
        assert_eq!(parse_bytes(b"a 1\n\xff 2\n"), Err(ParseError::NotUtf8 { offset: 4 }));
        assert_eq!(parse_bytes(b"a 1\n").map(|s| s.len()), Ok(1));
    }

    #[test]
    fn quotes_are_capped_on_a_character_boundary() {
        let long = "é".repeat(100);
        let error = parse_line(&format!("m {long}")).err();
        let Some(LineError::Value(quoted)) = error else { panic!("{error:?}") };
        assert_eq!(quoted, format!("{}…", "é".repeat(QUOTE_CHARS)));
    }

    #[test]
    fn fixtures() {
        let cases: &[(&str, &str, Result<usize, ParseError>)] = &[
            ("current", include_str!("../../../tests/fixtures/vllm-metrics/current.txt"), Ok(73)),
            ("v0-gpu-cache", include_str!("../../../tests/fixtures/vllm-metrics/v0-gpu-cache.txt"), Ok(55)),
            ("lora", include_str!("../../../tests/fixtures/vllm-metrics/lora.txt"), Ok(78)),
            ("multi-model", include_str!("../../../tests/fixtures/vllm-metrics/multi-model.txt"), Ok(186)),
            (
                "garbage",
                include_str!("../../../tests/fixtures/vllm-metrics/garbage.txt"),
                Err(ParseError::Line {
                    line: 7,
                    error: LineError::Syntax {
                        expected: "a metric name",
                        found: "`{\"object\":\"error\",\"message\":\"Int…`".into(),
                    },
                }),
            ),
            (
                "truncated",
                include_str!("../../../tests/fixtures/vllm-metrics/truncated.txt"),
                Err(ParseError::Line { line: 48, error: LineError::NoFinalNewline }),
            ),
        ];
        for (name, page, expected) in cases {
            assert_eq!(&parse(page).map(|s| s.len()), expected, "fixture {name}");
        }
    }

    #[test]
    fn errors_name_the_line() {
        let error = parse("a 1\nb{c=\"d\"} 2\nthis is not a metric\n");
        assert_eq!(error.map_err(|e| e.to_string()), Err("line 3: `is` is not a number".to_string()));
    }
}
