//! The endpoints file format, parsed once into validated `EndpointSpec`s.
//!
//! It owns the format (YAML, or JSON, with an `endpoints:` list), the 1 MiB size cap and
//! every per-field rule. A broken entry is skipped with a reason that names its index and
//! field; a broken *file* (unreadable, empty, not a mapping, no `endpoints` key, or no valid
//! entry at all) is an error, so that a truncated write never reads as "remove every
//! endpoint". It reads the file it is given and nothing else; it does not watch.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde_yaml::Value;

use super::DiscoveryError;

/// Files larger than this are rejected: an endpoints list is a few KiB, so anything near
/// this size is a wrong path or a runaway generator, and reading it whole costs memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The namespace of an entry that names none (as upstream).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Keys an entry may have; others are kept out of the spec and reported as warnings.
const ENTRY_KEYS: &[&str] = &["name", "namespace", "address", "port", "metricsPort", "labels"];

/// One inference worker from the endpoints file.
///
/// Invariant (when built by `parse_endpoints`): `name` and `namespace` are non-empty and
/// contain no `/` or whitespace, so `key()` is unambiguous; `address` is not the
/// unspecified address; `port` and `metrics_port` are not 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub name: String,
    pub namespace: String,
    pub address: IpAddr,
    /// Where inference requests are sent.
    pub port: u16,
    /// Where `/metrics` is scraped; `port` when absent.
    pub metrics_port: Option<u16>,
    pub labels: BTreeMap<String, String>,
}

impl EndpointSpec {
    /// The endpoint's identity, `namespace/name`: two entries with the same key are the same
    /// endpoint, even if its address changes.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Where requests go (`x-gateway-destination-endpoint`).
    pub fn target(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// Where metrics are scraped.
    pub fn metrics_target(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.metrics_port.unwrap_or(self.port))
    }
}

/// A parsed file: the valid endpoints in file order, plus what was left out and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub endpoints: Vec<EndpointSpec>,
    /// One reason per skipped entry, naming its index (and name, if readable) and field.
    pub skipped: Vec<String>,
    /// Things that did not stop an entry from being used (unknown keys, shared targets).
    pub warnings: Vec<String>,
}

/// Reads `path` (at most `MAX_FILE_BYTES`) and parses it.
pub fn load_file(path: &Path) -> Result<Parsed, DiscoveryError> {
    let bytes = read_file(path)?;
    parse_bytes(&bytes).map_err(|e| with_path(e, path))
}

/// Reads the raw bytes of `path`, refusing files over the size cap.
pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, DiscoveryError> {
    let read_err = |error| DiscoveryError::Read { path: path.to_path_buf(), error };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    if size > MAX_FILE_BYTES {
        return Err(DiscoveryError::TooLarge { path: path.to_path_buf(), size });
    }
    // The size can change between the stat and the read (a writer appending), so the cap
    // is enforced on the read too.
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > MAX_FILE_BYTES {
        return Err(DiscoveryError::TooLarge { path: path.to_path_buf(), size: read });
    }
    Ok(bytes)
}

/// Parses raw file bytes (which must be UTF-8).
pub(super) fn parse_bytes(bytes: &[u8]) -> Result<Parsed, DiscoveryError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| DiscoveryError::Parse(format!("not UTF-8 text (at byte {})", e.valid_up_to())))?;
    parse_endpoints(text)
}

/// Puts the file's path into a parse error, so a log line says which file is broken.
pub(super) fn with_path(e: DiscoveryError, path: &Path) -> DiscoveryError {
    match e {
        DiscoveryError::Parse(reason) => DiscoveryError::Parse(format!("{}: {reason}", path.display())),
        other => other,
    }
}

/// Parses the endpoints file text (YAML or JSON).
pub fn parse_endpoints(text: &str) -> Result<Parsed, DiscoveryError> {
    let fail = |reason: String| DiscoveryError::Parse(reason);
    if text.trim().is_empty() {
        return Err(fail("the file is empty (a truncated write?); an empty pool is written `endpoints: []`".into()));
    }
    let doc = parse_document(text).map_err(fail)?;
    let top = match doc {
        Value::Mapping(m) => m,
        Value::Null => return Err(fail("the file has no content (only comments?)".into())),
        other => return Err(fail(format!("must be a mapping with an `endpoints` list, got {}", kind(&other)))),
    };
    let mut parsed = Parsed::default();
    for key in top.keys().filter(|k| k.as_str() != Some("endpoints")) {
        parsed.warnings.push(format!("unknown top-level key {} ignored", key_name(key)));
    }
    let list = match top.get("endpoints") {
        Some(Value::Sequence(list)) => list,
        None => return Err(fail("missing the `endpoints` key (an empty pool is written `endpoints: []`)".into())),
        Some(Value::Null) => {
            return Err(fail("`endpoints` has no value (an empty pool is written `endpoints: []`)".into()));
        }
        Some(other) => return Err(fail(format!("`endpoints` must be a list, got {}", kind(other)))),
    };

    // key -> index of the entry that claimed it first; target -> the same, for warnings.
    let mut keys: HashMap<String, usize> = HashMap::new();
    let mut targets: HashMap<SocketAddr, usize> = HashMap::new();
    for (index, entry) in list.iter().enumerate() {
        let spec = match parse_entry(index, entry, &mut parsed.warnings) {
            Ok(spec) => spec,
            Err(reason) => {
                parsed.skipped.push(reason);
                continue;
            }
        };
        let key = spec.key();
        if let Some(first) = keys.get(&key) {
            parsed.skipped.push(format!("endpoints[{index}] ({}): duplicate of endpoints[{first}] ({key})", spec.name));
            continue;
        }
        keys.insert(key, index);
        // Two names for one worker is legal but usually a copy-paste slip, and it doubles
        // the worker's share of picks.
        if let Some(first) = targets.insert(spec.target(), index) {
            parsed.warnings.push(format!(
                "endpoints[{index}] ({}): same address and port as endpoints[{first}] ({})",
                spec.name,
                spec.target()
            ));
        }
        parsed.endpoints.push(spec);
    }
    // A list whose every entry is broken (say, `address` renamed in all of them) is a
    // broken file, not a request to drain the pool.
    if parsed.endpoints.is_empty() && !list.is_empty() {
        return Err(fail(format!("none of the {} entries is valid: {}", list.len(), summarize(&parsed.skipped))));
    }
    Ok(parsed)
}

/// YAML accepts JSON, but JSON is tried first for text that looks like it, since its
/// errors are clearer and it allows tabs that YAML indentation forbids.
fn parse_document(text: &str) -> Result<Value, String> {
    if text.trim_start().starts_with('{') {
        match serde_json::from_str::<Value>(text) {
            Ok(doc) => return Ok(doc),
            // A YAML flow mapping (`{endpoints: []}`) is not JSON but is still valid.
            Err(json_err) => return serde_yaml::from_str(text).map_err(|_| format!("not valid JSON: {json_err}")),
        }
    }
    serde_yaml::from_str(text).map_err(|e| format!("not valid YAML: {e}"))
}

fn parse_entry(index: usize, entry: &Value, warnings: &mut Vec<String>) -> Result<EndpointSpec, String> {
    let Value::Mapping(m) = entry else {
        return Err(format!(
            "endpoints[{index}]: must be a mapping with `name`, `address` and `port`, got {}",
            kind(entry)
        ));
    };
    let at = match m.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) {
        Some(name) => format!("endpoints[{index}] ({name})"),
        None => format!("endpoints[{index}]"),
    };
    let at = at.as_str();
    let field = |name: &'static str| move |reason: String| format!("{at}: `{name}` {reason}");
    for key in m.keys().filter(|k| !k.as_str().is_some_and(|k| ENTRY_KEYS.contains(&k))) {
        warnings.push(format!("{at}: unknown key {} ignored", key_name(key)));
    }

    let name = identifier(m.get("name")).map_err(field("name"))?;
    let namespace = match m.get("namespace") {
        None | Some(Value::Null) => DEFAULT_NAMESPACE.to_string(),
        v => identifier(v).map_err(field("namespace"))?,
    };
    let address = required_str(m.get("address")).and_then(parse_address).map_err(field("address"))?;
    let port = match m.get("port") {
        None | Some(Value::Null) => return Err(field("port")("is required".into())),
        Some(v) => parse_port(v).map_err(field("port"))?,
    };
    let metrics_port = match m.get("metricsPort") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_port(v).map_err(field("metricsPort"))?),
    };
    let labels = parse_labels(m.get("labels")).map_err(field("labels"))?;
    Ok(EndpointSpec { name, namespace, address, port, metrics_port, labels })
}

fn required_str(v: Option<&Value>) -> Result<&str, String> {
    match v {
        None | Some(Value::Null) => Err("is required".into()),
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("must be a string, got {} (quote it)", kind(other))),
    }
}

/// A name or namespace: it becomes half of `namespace/name`, so `/` would make keys collide.
fn identifier(v: Option<&Value>) -> Result<String, String> {
    let s = required_str(v)?;
    if s.is_empty() {
        return Err("is empty".into());
    }
    if let Some(c) = s.chars().find(|c| *c == '/' || c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?} contains {c:?}, which a name may not"));
    }
    Ok(s.to_string())
}

fn parse_address(s: &str) -> Result<IpAddr, String> {
    // `[::1]` is how IPv6 is often written next to a port; accept it without the port.
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    match bare.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Err(format!("is {ip}, the unspecified address, which cannot be connected to")),
        Ok(ip) => Ok(ip),
        Err(_) if s.parse::<SocketAddr>().is_ok() => {
            Err(format!("{s:?} includes a port; give the IP alone here and the port in `port`"))
        }
        // Envoy's ORIGINAL_DST cluster connects to the address exactly as we send it, so a
        // name would have to be resolved here, and re-resolved when DNS changes: that is
        // the job of whatever writes the file.
        Err(_) if looks_like_hostname(s) => Err(format!(
            "{s:?} is a hostname; an IPv4 or IPv6 literal is required (resolve it before writing the file)"
        )),
        Err(_) => Err(format!("{s:?} is not an IPv4 or IPv6 address")),
    }
}

fn looks_like_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && s.chars().any(|c| c.is_ascii_alphabetic())
}

/// A port, written as upstream does (a string, `"8000"`) or as a YAML number.
fn parse_port(v: &Value) -> Result<u16, String> {
    let parsed = match v {
        // Only digits: `u64::from_str` would also take `+8000`.
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse::<u64>().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    };
    match parsed.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) {
        Some(port) => Ok(port),
        None => Err(format!("must be a port number from 1 to 65535, got {}", kind(v))),
    }
}

/// Labels are strings upstream (Kubernetes labels); numbers and bools are what YAML makes
/// of unquoted `version: 2` or `canary: true`, so they are turned back into their text.
fn parse_labels(v: Option<&Value>) -> Result<BTreeMap<String, String>, String> {
    let m = match v {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Mapping(m)) => m,
        Some(other) => return Err(format!("must be a mapping of strings, got {}", kind(other))),
    };
    let mut labels = BTreeMap::new();
    for (k, v) in m {
        let key = scalar_text(k).filter(|k| !k.is_empty()).ok_or_else(|| format!("has an invalid key {}", kind(k)))?;
        let value = scalar_text(v)
            .ok_or_else(|| format!("value of `{key}` must be a string, number or bool, got {}", kind(v)))?;
        labels.insert(key, value);
    }
    Ok(labels)
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn key_name(k: &Value) -> String {
    match k.as_str() {
        Some(s) => format!("`{s}`"),
        None => kind(k),
    }
}

fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the bool {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

/// At most three reasons, so one log line stays readable for a long broken list.
fn summarize(reasons: &[String]) -> String {
    let mut s = reasons.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
    if reasons.len() > 3 {
        s.push_str(&format!("; and {} more", reasons.len() - 3));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, addr: &str, port: u16) -> EndpointSpec {
        EndpointSpec {
            name: name.into(),
            namespace: DEFAULT_NAMESPACE.into(),
            address: addr.parse().unwrap(),
            port,
            metrics_port: None,
            labels: BTreeMap::new(),
        }
    }

    fn with_labels(mut e: EndpointSpec, labels: &[(&str, &str)]) -> EndpointSpec {
        e.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        e
    }

    fn with_metrics(mut e: EndpointSpec, port: u16) -> EndpointSpec {
        e.metrics_port = Some(port);
        e
    }

    fn in_ns(mut e: EndpointSpec, ns: &str) -> EndpointSpec {
        e.namespace = ns.into();
        e
    }

    /// A file that parses: the endpoints, and a fragment each skipped reason / warning must
    /// contain (in order).
    struct Good {
        name: &'static str,
        text: &'static str,
        endpoints: Vec<EndpointSpec>,
        skipped: &'static [&'static str],
        warnings: &'static [&'static str],
    }

    #[test]
    fn parses_good_files() {
        let cases = vec![
            Good {
                name: "valid file, upstream style",
                text: r#"
endpoints:
  - name: vllm-0
    namespace: prod
    address: 10.0.0.1
    port: "8000"
    metricsPort: "8001"
    labels: {model: Qwen3-32B}
  - name: vllm-1
    address: 10.0.0.2
    port: "8000"
"#,
                endpoints: vec![
                    in_ns(
                        with_metrics(with_labels(ep("vllm-0", "10.0.0.1", 8000), &[("model", "Qwen3-32B")]), 8001),
                        "prod",
                    ),
                    ep("vllm-1", "10.0.0.2", 8000),
                ],
                skipped: &[],
                warnings: &[],
            },
            Good {
                name: "string and numeric ports",
                text: "endpoints:\n- {name: a, address: 127.0.0.1, port: 8000, metricsPort: 9000}\n\
                       - {name: b, address: 127.0.0.1, port: '8001', metricsPort: '65535'}\n",
                endpoints: vec![
                    with_metrics(ep("a", "127.0.0.1", 8000), 9000),
                    with_metrics(ep("b", "127.0.0.1", 8001), 65535),
                ],
                skipped: &[],
                warnings: &[],
            },
            Good {
                name: "bad ports are skipped, naming index and field",
                text: "endpoints:\n- {name: ok, address: 127.0.0.1, port: 1}\n\
                       - {name: zero, address: 127.0.0.1, port: 0}\n\
                       - {name: big, address: 127.0.0.1, port: 70000}\n\
                       - {name: abc, address: 127.0.0.1, port: abc}\n\
                       - {name: plus, address: 127.0.0.1, port: '+80'}\n\
                       - {name: float, address: 127.0.0.1, port: 80.5}\n\
                       - {name: bigstr, address: 127.0.0.1, port: '70000'}\n\
                       - {name: noport, address: 127.0.0.1}\n\
                       - {name: badmetrics, address: 127.0.0.1, port: 80, metricsPort: '0'}\n",
                endpoints: vec![ep("ok", "127.0.0.1", 1)],
                skipped: &[
                    "endpoints[1] (zero): `port` must be a port number from 1 to 65535, got the number 0",
                    "endpoints[2] (big): `port`",
                    "endpoints[3] (abc): `port` must be a port number from 1 to 65535, got the string \"abc\"",
                    "endpoints[4] (plus): `port`",
                    "endpoints[5] (float): `port`",
                    "endpoints[6] (bigstr): `port`",
                    "endpoints[7] (noport): `port` is required",
                    "endpoints[8] (badmetrics): `metricsPort`",
                ],
                warnings: &[],
            },
            Good {
                name: "addresses: IPv6 accepted, hostnames and others rejected with a reason",
                text: "endpoints:\n- {name: v6, address: '::1', port: 80}\n\
                       - {name: v6b, address: '[fd00::2]', port: 80}\n\
                       - {name: host, address: vllm-0.example.com, port: 80}\n\
                       - {name: local, address: localhost, port: 80}\n\
                       - {name: withport, address: '10.0.0.1:8000', port: 80}\n\
                       - {name: garbage, address: '10.0.0.256', port: 80}\n\
                       - {name: any, address: 0.0.0.0, port: 80}\n\
                       - {name: none, port: 80}\n",
                endpoints: vec![ep("v6", "::1", 80), ep("v6b", "fd00::2", 80)],
                skipped: &[
                    "endpoints[2] (host): `address` \"vllm-0.example.com\" is a hostname",
                    "endpoints[3] (local): `address` \"localhost\" is a hostname",
                    "endpoints[4] (withport): `address` \"10.0.0.1:8000\" includes a port",
                    "endpoints[5] (garbage): `address` \"10.0.0.256\" is not an IPv4 or IPv6 address",
                    "endpoints[6] (any): `address` is 0.0.0.0, the unspecified address",
                    "endpoints[7] (none): `address` is required",
                ],
                warnings: &[],
            },
            Good {
                name: "missing or bad names",
                text: "endpoints:\n- {name: ok, address: 127.0.0.1, port: 80}\n\
                       - {address: 127.0.0.2, port: 80}\n\
                       - {name: '', address: 127.0.0.3, port: 80}\n\
                       - {name: a/b, address: 127.0.0.4, port: 80}\n\
                       - {name: 7, address: 127.0.0.5, port: 80}\n\
                       - {name: x, namespace: '', address: 127.0.0.6, port: 80}\n\
                       - just-a-string\n",
                endpoints: vec![ep("ok", "127.0.0.1", 80)],
                skipped: &[
                    "endpoints[1]: `name` is required",
                    "endpoints[2]: `name` is empty",
                    "endpoints[3] (a/b): `name` \"a/b\" contains '/'",
                    "endpoints[4]: `name` must be a string, got the number 7",
                    "endpoints[5] (x): `namespace` is empty",
                    "endpoints[6]: must be a mapping",
                ],
                warnings: &[],
            },
            Good {
                name: "duplicates: the later one is skipped; same name in another namespace is fine",
                text: "endpoints:\n- {name: a, address: 127.0.0.1, port: 80}\n\
                       - {name: a, address: 127.0.0.2, port: 80}\n\
                       - {name: a, namespace: other, address: 127.0.0.3, port: 80}\n\
                       - {name: b, address: 127.0.0.1, port: 80}\n",
                endpoints: vec![
                    ep("a", "127.0.0.1", 80),
                    in_ns(ep("a", "127.0.0.3", 80), "other"),
                    ep("b", "127.0.0.1", 80),
                ],
                skipped: &["endpoints[1] (a): duplicate of endpoints[0] (default/a)"],
                warnings: &["endpoints[3] (b): same address and port as endpoints[0]"],
            },
            Good {
                name: "empty list is an empty pool",
                text: "endpoints: []\n",
                endpoints: vec![],
                skipped: &[],
                warnings: &[],
            },
            Good {
                name: "JSON, with tabs",
                text: "{\n\t\"endpoints\": [\n\t\t{\"name\": \"a\", \"address\": \"10.1.2.3\", \"port\": \"8000\", \
                       \"labels\": {\"model\": \"m\"}}\n\t]\n}\n",
                endpoints: vec![with_labels(ep("a", "10.1.2.3", 8000), &[("model", "m")])],
                skipped: &[],
                warnings: &[],
            },
            Good {
                name: "YAML flow mapping that is not JSON",
                text: "{endpoints: [{name: a, address: 10.1.2.3, port: 1}]}",
                endpoints: vec![ep("a", "10.1.2.3", 1)],
                skipped: &[],
                warnings: &[],
            },
            Good {
                name: "labels with numbers and bools become text; bad label values skip the entry",
                text: "endpoints:\n- {name: a, address: 127.0.0.1, port: 80, labels: {version: 2, ratio: 0.5, canary: true, s: x}}\n\
                       - {name: b, address: 127.0.0.2, port: 80, labels: {list: [1]}}\n\
                       - {name: c, address: 127.0.0.3, port: 80, labels: [a]}\n\
                       - {name: d, address: 127.0.0.4, port: 80, labels: null}\n",
                endpoints: vec![
                    with_labels(
                        ep("a", "127.0.0.1", 80),
                        &[("canary", "true"), ("ratio", "0.5"), ("s", "x"), ("version", "2")],
                    ),
                    ep("d", "127.0.0.4", 80),
                ],
                skipped: &[
                    "endpoints[1] (b): `labels` value of `list` must be a string, number or bool",
                    "endpoints[2] (c): `labels` must be a mapping",
                ],
                warnings: &[],
            },
            Good {
                name: "unknown keys are warnings, the entry is kept",
                text: "kind: whatever\nendpoints:\n- {name: a, address: 127.0.0.1, port: 80, weight: 3}\n",
                endpoints: vec![ep("a", "127.0.0.1", 80)],
                skipped: &[],
                warnings: &["unknown top-level key `kind` ignored", "endpoints[0] (a): unknown key `weight` ignored"],
            },
        ];
        for case in cases {
            let got = parse_endpoints(case.text).unwrap_or_else(|e| panic!("{}: {e}", case.name));
            assert_eq!(got.endpoints, case.endpoints, "{}", case.name);
            assert_contains_each(case.name, "skipped", &got.skipped, case.skipped);
            assert_contains_each(case.name, "warnings", &got.warnings, case.warnings);
        }
    }

    fn assert_contains_each(case: &str, what: &str, got: &[String], want: &[&str]) {
        assert_eq!(got.len(), want.len(), "{case}: {what} = {got:#?}");
        for (g, w) in got.iter().zip(want) {
            assert!(g.contains(w), "{case}: {what}: {g:?} should contain {w:?}");
        }
    }

    #[test]
    fn rejects_bad_files() {
        // (case, text, fragment of the error)
        let cases = [
            ("empty file", "", "the file is empty"),
            ("whitespace only", "  \n\n", "the file is empty"),
            ("comments only", "# nothing yet\n", "no content"),
            ("missing key", "other: []\n", "missing the `endpoints` key"),
            ("null list", "endpoints:\n", "`endpoints` has no value"),
            ("not a list", "endpoints: {a: 1}\n", "`endpoints` must be a list, got a mapping"),
            ("not a mapping", "- a\n- b\n", "must be a mapping with an `endpoints` list, got a list"),
            ("scalar", "hello", "got the string \"hello\""),
            ("bad YAML", "endpoints: [\n", "not valid YAML"),
            ("bad JSON", "{\"endpoints\": [,]}", "not valid JSON"),
            ("truncated", "endpoints:\n  - name: a\n    address: 127.0.0.1\n    port: \"80", "not valid YAML"),
            ("no valid entry", "endpoints:\n- {name: a, host: 10.0.0.1, port: 80}\n", "none of the 1 entries is valid"),
        ];
        for (case, text, want) in cases {
            match parse_endpoints(text) {
                Err(DiscoveryError::Parse(reason)) => {
                    assert!(reason.contains(want), "{case}: {reason:?} lacks {want:?}")
                }
                other => panic!("{case}: want a parse error containing {want:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn key_and_targets() {
        let e = in_ns(with_metrics(ep("w", "fd00::1", 8000), 9000), "ns");
        assert_eq!(e.key(), "ns/w");
        assert_eq!(e.target().to_string(), "[fd00::1]:8000");
        assert_eq!(e.metrics_target().to_string(), "[fd00::1]:9000");
        assert_eq!(ep("w", "10.0.0.1", 80).metrics_target().to_string(), "10.0.0.1:80");
    }

    #[test]
    fn load_file_reads_caps_and_names_the_path() {
        let dir = std::env::temp_dir().join(format!("epp-discovery-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        std::fs::write(&good, "endpoints: [{name: a, address: 127.0.0.1, port: 80}]").unwrap();
        let bad = dir.join("bad.yaml");
        std::fs::write(&bad, "").unwrap();
        let big = dir.join("big.yaml");
        let mut text = String::from("endpoints: []\n");
        text.push_str(&"#".repeat(usize::try_from(MAX_FILE_BYTES).unwrap()));
        std::fs::write(&big, text).unwrap();
        let binary = dir.join("binary.yaml");
        std::fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();

        assert_eq!(load_file(&good).unwrap().endpoints, vec![ep("a", "127.0.0.1", 80)]);
        let err = load_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.yaml") && err.contains("empty"), "{err}");
        assert!(matches!(load_file(&big), Err(DiscoveryError::TooLarge { size, .. }) if size > MAX_FILE_BYTES));
        let err = load_file(&binary).unwrap_err().to_string();
        assert!(err.contains("binary.yaml") && err.contains("UTF-8"), "{err}");
        match load_file(&dir.join("missing.yaml")) {
            Err(e @ DiscoveryError::Read { .. }) => assert!(e.to_string().contains("missing.yaml"), "{e}"),
            other => panic!("want a read error, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
