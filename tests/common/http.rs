//! A raw HTTP/1.1 client that sends requests exactly as written.
#![allow(dead_code)]

use super::*;

/// `name{a="x",b="y"}` -> (name, [(a, x), (b, y)]).
fn parse_series(series: &str) -> (&str, Vec<(&str, &str)>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series, Vec::new());
    };
    let labels = rest
        .trim_end_matches('}')
        .split("\",")
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k, v.trim_end_matches('"')))
        })
        .collect();
    (name, labels)
}

/// A metric's value summed over every series that has the given labels,
/// e.g. `tollgate_requests_total{route="a",status="200"}` (whatever other
/// labels, such as `protocol`, the series carry); `None` when none exists.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    let (name, wanted) = parse_series(series);
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = parse_series(head);
        if n != name || !wanted.iter().all(|w| labels.contains(w)) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts the documented refusal shape (JSON error and message, request id).
    pub fn assert_refusal(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        assert!(self.header("x-request-id").is_some(), "no x-request-id");
        let v = self.json();
        assert_eq!(v["error"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
}

pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    request(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
}

/// Sends `raw` bytes as they are and reads one response.
pub fn request(port: u16, raw: &str) -> std::io::Result<Response> {
    let mut c = Client::connect(port)?;
    c.send_raw(raw.as_bytes())?;
    c.read_response()
}

/// One keep-alive connection.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    pub fn send_raw(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(raw)
    }

    pub fn get(&mut self, path: &str, extra_headers: &str) -> std::io::Result<Response> {
        self.send_raw(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra_headers}\r\n").as_bytes(),
        )?;
        self.read_response()
    }

    pub fn read_response(&mut self) -> std::io::Result<Response> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let mut body = Vec::new();
        if let Some(len) = headers.get("content-length") {
            let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
            body.resize(len, 0);
            self.reader.read_exact(&mut body)?;
        } else if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size)?;
                let size = usize::from_str_radix(size.trim(), 16).map_err(|_| bad("chunk size"))?;
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if status >= 200 && status != 204 && status != 304 {
            self.reader.read_to_end(&mut body)?;
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}
