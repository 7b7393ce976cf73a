//! Streaming `multipart/form-data` (RFC 7578 framing over RFC 2046) for the upload server's
//! form endpoints (`/v1beta1/upload-form` and `upload-form-async`, where the first part named
//! `file` carries the disk image and every other part is logged and ignored).
//!
//! This module owns:
//!
//! * [`boundary`]: the boundary parameter of a request's `Content-Type`;
//! * [`Multipart`]: a pull parser over any [`Read`] that skips the preamble, finds delimiters,
//!   parses each part's headers ([`PartInfo`], at most [`MAX_HEADER_BYTES`] and
//!   [`MAX_PART_HEADERS`]) and ignores the epilogue;
//! * [`PartReader`]: the current part's body as a [`Read`] + [`BufRead`] that hands out bytes
//!   as soon as they certainly are not the start of a delimiter;
//! * [`find_field`]: the server's "skip to the `file` part" convenience.
//!
//! Parts are never buffered whole: bodies are multi-GiB disk images. Memory is one fixed
//! window of [`WINDOW`] bytes plus the delimiter's length, however large the parts are; a
//! delimiter split across reads is still found. A body that ends before its closing delimiter
//! is an error (`UnexpectedEof` from the part reader), never silently truncated data.
//!
//! Framing rules: the delimiter is CRLF `--` boundary (the first one may start the body
//! without the CRLF). A candidate delimiter is taken as one only when the byte after it is
//! `-`, space, tab, CR or LF (as Go's `mime/multipart` does); then it must go on with `--`
//! (the close) or transport padding (spaces/tabs) and CRLF. `\r\n--boundaryX` for any other
//! `X` is data. Header lines must end in CRLF; folded lines are refused.

use std::io::{self, BufRead, Read};

use crate::error::{Error, ErrorKind, Result};

/// Bytes of body the reader holds at most besides the delimiter (its read buffer).
pub const WINDOW: usize = 64 * 1024;
/// Largest header block of one part, its terminating empty line included.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most header fields in one part.
pub const MAX_PART_HEADERS: usize = 64;
/// Longest boundary RFC 2046 allows.
pub const MAX_BOUNDARY_LEN: usize = 70;

/// The boundary from a `Content-Type` value like `multipart/form-data; boundary="abc"`
/// (quoted or not, any case for the media type and the parameter name).
///
/// `None` when the type is not `multipart/form-data`, the parameters are malformed, or there
/// is no valid boundary: 1..=70 printable ASCII characters, not ending in a space (RFC 2046;
/// its narrower `bchars` set is not enforced, as real clients stray from it harmlessly).
pub fn boundary(content_type: &str) -> Option<String> {
    let (media, params) = parse_params(content_type)?;
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let (_, b) = params
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("boundary"))?;
    valid_boundary(&b).then_some(b)
}

fn valid_boundary(b: &str) -> bool {
    (1..=MAX_BOUNDARY_LEN).contains(&b.len())
        && b.bytes().all(|c| (0x20..=0x7e).contains(&c))
        && !b.ends_with(' ')
}

/// What a part's headers say about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartInfo {
    /// The form field name (`Content-Disposition: form-data; name="..."`).
    pub name: Option<String>,
    /// The uploaded file's name (`filename="..."`; `filename*=` is ignored).
    pub filename: Option<String>,
    /// The part's `Content-Type`, verbatim.
    pub content_type: Option<String>,
    /// Every header in order, names as sent, values trimmed (non-UTF-8 bytes replaced).
    pub headers: Vec<(String, String)>,
}

impl PartInfo {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
enum State {
    /// Before the first delimiter.
    Preamble,
    /// Inside a part's body (headers parsed).
    Body,
    /// A delimiter was consumed; its line's rest and the next part's headers follow.
    Delimiter,
    /// The closing delimiter was seen; the epilogue is never read.
    Closed,
    /// The body was malformed or truncated: every later call repeats this error.
    Failed(io::ErrorKind, String),
}

/// A streaming `multipart/form-data` reader over `body`. See the module documentation.
pub struct Multipart<R: Read> {
    body: R,
    /// CRLF `--` boundary.
    delim: Box<[u8]>,
    /// `WINDOW + delim.len() + 1` bytes, allocated once.
    buf: Box<[u8]>,
    /// Unconsumed bytes are `buf[start..end]`; in the preamble or a body, `buf[start..safe]`
    /// are known not to belong to a delimiter. Always `start <= safe <= end`.
    start: usize,
    safe: usize,
    end: usize,
    state: State,
    current: Option<PartInfo>,
}

impl<R: Read> Multipart<R> {
    /// A reader for a body framed with `boundary` (as returned by [`boundary`]).
    pub fn new(body: R, boundary: &str) -> Multipart<R> {
        let mut delim = Vec::with_capacity(boundary.len() + 4);
        delim.extend_from_slice(b"\r\n--");
        delim.extend_from_slice(boundary.as_bytes());
        let mut buf = vec![0u8; WINDOW + delim.len() + 1].into_boxed_slice();
        // A virtual CRLF lets the first delimiter start the body without one, while a
        // boundary in the middle of a preamble line is still no delimiter.
        buf[..2].copy_from_slice(b"\r\n");
        Multipart {
            body,
            delim: delim.into_boxed_slice(),
            buf,
            start: 0,
            safe: 0,
            end: 2,
            state: State::Preamble,
            current: None,
        }
    }

    /// Advance to the next part: skips the preamble before the first delimiter and any unread
    /// rest of the current part, then parses the part's headers (at most
    /// [`MAX_HEADER_BYTES`] and [`MAX_PART_HEADERS`]). `Ok(None)` after the closing
    /// delimiter `--boundary--`. Malformed or truncated input is
    /// [`ErrorKind::InvalidArgument`]; errors of the underlying reader are I/O errors.
    pub fn next_part(&mut self) -> Result<Option<PartInfo>> {
        self.current = None;
        match self.advance_part() {
            Ok(info) => {
                self.current.clone_from(&info);
                Ok(info)
            }
            Err(e) => Err(match &self.state {
                State::Failed(_, msg) => Error::new(ErrorKind::InvalidArgument, msg.clone()),
                _ => Error::io("reading the multipart body", e),
            }),
        }
    }

    /// Reader over the current part's body bytes, ending at the next delimiter. Empty before
    /// the first [`next_part`](Self::next_part) and after the close.
    pub fn part_reader(&mut self) -> PartReader<'_, R> {
        PartReader { mp: self }
    }

    /// The headers of the current part, if [`next_part`](Self::next_part) returned one.
    pub fn current(&self) -> Option<&PartInfo> {
        self.current.as_ref()
    }

    fn advance_part(&mut self) -> io::Result<Option<PartInfo>> {
        loop {
            match &self.state {
                State::Failed(kind, msg) => return Err(io::Error::new(*kind, msg.clone())),
                State::Closed => return Ok(None),
                State::Preamble | State::Body => {
                    while self.certify()? {
                        self.start = self.safe;
                    }
                }
                State::Delimiter => break,
            }
        }
        if self.finish_delimiter()? {
            self.state = State::Closed;
            return Ok(None);
        }
        let info = self.read_headers()?;
        self.state = State::Body;
        self.safe = self.start;
        Ok(Some(info))
    }

    fn fail(&mut self, kind: io::ErrorKind, msg: impl Into<String>) -> io::Error {
        let msg = msg.into();
        self.state = State::Failed(kind, msg.clone());
        io::Error::new(kind, msg)
    }

    fn advance(&mut self, n: usize) {
        self.start += n;
        self.safe = self.safe.max(self.start);
    }

    /// Read more of the body after the unconsumed bytes; 0 at its end.
    fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            (self.start, self.safe, self.end) = (0, 0, 0);
        } else if self.start > 0 && self.buf.len() - self.end < WINDOW / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.safe -= self.start;
            self.start = 0;
        }
        let room = self.buf.len() - self.end;
        debug_assert!(room > 0);
        loop {
            match self.body.read(&mut self.buf[self.end..]) {
                Ok(n) => {
                    let n = n.min(room);
                    self.end += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Read until `n` unconsumed bytes are buffered (`n` at most `MAX_HEADER_BYTES + 4`).
    fn want(&mut self, n: usize, eof_msg: &str) -> io::Result<()> {
        while self.end - self.start < n {
            if self.fill()? == 0 {
                return Err(self.fail(io::ErrorKind::UnexpectedEof, eof_msg));
            }
        }
        Ok(())
    }

    /// In the preamble or a body: make `buf[start..safe]` non-empty and return true, or
    /// consume the delimiter that comes next and return false (also false in other states).
    fn certify(&mut self) -> io::Result<bool> {
        loop {
            match &self.state {
                State::Preamble | State::Body => {}
                State::Failed(kind, msg) => return Err(io::Error::new(*kind, msg.clone())),
                State::Delimiter | State::Closed => return Ok(false),
            }
            if self.start < self.safe {
                return Ok(true);
            }
            let dl = self.delim.len();
            let hay = &self.buf[self.start..self.end];
            match find(hay, &self.delim) {
                Some(0) => {
                    if let Some(&b) = hay.get(dl) {
                        if matches!(b, b'-' | b' ' | b'\t' | b'\r' | b'\n') {
                            self.advance(dl);
                            self.state = State::Delimiter;
                            return Ok(false);
                        }
                        // `--boundaryX`: only the CR is certainly data.
                        self.safe = self.start + 1;
                        return Ok(true);
                    }
                }
                Some(p) => {
                    self.safe = self.start + p;
                    return Ok(true);
                }
                None => {
                    let keep = partial_suffix(hay, &self.delim);
                    if hay.len() > keep {
                        self.safe = self.end - keep;
                        return Ok(true);
                    }
                }
            }
            if self.fill()? == 0 {
                let msg = match self.state {
                    State::Preamble => "multipart body has no boundary line",
                    _ => "multipart body ends before the closing boundary",
                };
                return Err(self.fail(io::ErrorKind::UnexpectedEof, msg));
            }
        }
    }

    /// After a delimiter: `--` (close, returns true) or padding and CRLF (returns false).
    fn finish_delimiter(&mut self) -> io::Result<bool> {
        const EOF: &str = "multipart body ends inside a boundary line";
        const BAD: &str = "malformed multipart boundary line";
        self.want(1, EOF)?;
        if self.buf[self.start] == b'-' {
            self.want(2, EOF)?;
            if self.buf[self.start + 1] != b'-' {
                return Err(self.fail(io::ErrorKind::InvalidData, BAD));
            }
            self.advance(2);
            return Ok(true);
        }
        let mut padding = 0;
        loop {
            self.want(1, EOF)?;
            if !matches!(self.buf[self.start], b' ' | b'\t') {
                break;
            }
            self.advance(1);
            padding += 1;
            if padding > MAX_HEADER_BYTES {
                return Err(self.fail(io::ErrorKind::InvalidData, BAD));
            }
        }
        self.want(2, EOF)?;
        if &self.buf[self.start..self.start + 2] != b"\r\n" {
            return Err(self.fail(io::ErrorKind::InvalidData, BAD));
        }
        self.advance(2);
        Ok(false)
    }

    /// The header block up to and including its empty line.
    fn read_headers(&mut self) -> io::Result<PartInfo> {
        let (block_len, skip) = loop {
            let hay = &self.buf[self.start..self.end];
            if hay.starts_with(b"\r\n") {
                break (0, 2);
            }
            let lim = hay.len().min(MAX_HEADER_BYTES);
            if let Some(p) = find(&hay[..lim], b"\r\n\r\n") {
                break (p + 2, p + 4);
            }
            if hay.len() >= MAX_HEADER_BYTES {
                let msg = format!("multipart part headers exceed {MAX_HEADER_BYTES} bytes");
                return Err(self.fail(io::ErrorKind::InvalidData, msg));
            }
            if self.fill()? == 0 {
                let msg = "multipart body ends inside a part's headers";
                return Err(self.fail(io::ErrorKind::UnexpectedEof, msg));
            }
        };
        let parsed = parse_headers(&self.buf[self.start..self.start + block_len]);
        self.advance(skip);
        parsed.map_err(|msg| self.fail(io::ErrorKind::InvalidData, msg))
    }
}

/// The current part's body; see [`Multipart::part_reader`]. Ends (reads 0) at the delimiter;
/// a body cut short is an `UnexpectedEof` error, malformed framing `InvalidData`.
pub struct PartReader<'a, R: Read> {
    mp: &'a mut Multipart<R>,
}

impl<R: Read> PartReader<'_, R> {
    /// The headers of the part being read.
    pub fn info(&self) -> Option<&PartInfo> {
        self.mp.current()
    }
}

impl<R: Read> Read for PartReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let avail = self.fill_buf()?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> BufRead for PartReader<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let mp = &mut *self.mp;
        if matches!(mp.state, State::Preamble) || !mp.certify()? {
            return Ok(&[]);
        }
        Ok(&mp.buf[mp.start..mp.safe])
    }

    fn consume(&mut self, n: usize) {
        let mp = &mut *self.mp;
        if matches!(mp.state, State::Body) {
            mp.start += n.min(mp.safe - mp.start);
        }
    }
}

/// Skip parts until the one whose form name is `field` and return its reader. Every other
/// part is passed to `on_other` (for logging) and its body skipped. No such part is an
/// [`ErrorKind::InvalidArgument`] error "no '`field`' part in the form".
pub fn find_field<'a, R: Read>(
    mp: &'a mut Multipart<R>,
    field: &str,
    on_other: &mut dyn FnMut(&PartInfo),
) -> Result<PartReader<'a, R>> {
    while let Some(info) = mp.next_part()? {
        if info.name.as_deref() == Some(field) {
            return Ok(mp.part_reader());
        }
        on_other(&info);
    }
    Err(Error::invalid(format!("no '{field}' part in the form")))
}

/// The first occurrence of `needle` (non-empty) in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = needle[0];
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        let last_start = hay.len() - needle.len();
        let at = i + hay[i..=last_start].iter().position(|&b| b == first)?;
        if hay[at..at + needle.len()] == *needle {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

/// The length of the longest suffix of `hay` that is a proper prefix of `delim`.
fn partial_suffix(hay: &[u8], delim: &[u8]) -> usize {
    let max = hay.len().min(delim.len() - 1);
    (1..=max)
        .rev()
        .find(|&k| hay[hay.len() - k..] == delim[..k])
        .unwrap_or(0)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Header lines, each ending in CRLF, without the empty line.
fn parse_headers(block: &[u8]) -> std::result::Result<PartInfo, String> {
    let mut info = PartInfo::default();
    let mut rest = block;
    while let Some(n) = find(rest, b"\r\n") {
        let line = &rest[..n];
        rest = &rest[n + 2..];
        if line.iter().any(|&b| b == b'\r' || b == b'\n') {
            return Err("multipart part header lines must end in CRLF".into());
        }
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err("folded multipart part header lines are not supported".into());
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err("multipart part header line without a colon".into());
        };
        let name = &line[..colon];
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err("malformed multipart part header name".into());
        }
        if info.headers.len() == MAX_PART_HEADERS {
            return Err(format!(
                "more than {MAX_PART_HEADERS} headers in a multipart part"
            ));
        }
        let value = String::from_utf8_lossy(&line[colon + 1..]);
        let value = value.trim_matches([' ', '\t']).to_string();
        // The name is ASCII (tchars).
        let name = String::from_utf8_lossy(name).into_owned();
        info.headers.push((name, value));
    }
    debug_assert!(rest.is_empty());
    if let Some(cd) = info.header("content-disposition") {
        let Some((_, params)) = parse_params(cd) else {
            return Err(format!("malformed Content-Disposition {cd:?}"));
        };
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        };
        info.name = get("name");
        info.filename = get("filename");
    }
    info.content_type = info.header("content-type").map(str::to_string);
    Ok(info)
}

/// `value; k=v; k="quoted \"v\""`: the leading value (trimmed) and the parameters, or None
/// when malformed. Parameter names must be tokens; unquoted values end at `;` or whitespace.
fn parse_params(value: &str) -> Option<(&str, Vec<(String, String)>)> {
    const WS: [char; 2] = [' ', '\t'];
    let (head, mut rest) = value.split_at(value.find(';').unwrap_or(value.len()));
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches(WS);
        if rest.is_empty() {
            break;
        }
        rest = rest.strip_prefix(';')?.trim_start_matches(WS);
        if rest.is_empty() || rest.starts_with(';') {
            continue; // a trailing or doubled `;`
        }
        let eq = rest.find('=')?;
        let name = rest[..eq].trim_end_matches(WS);
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return None;
        }
        rest = rest[eq + 1..].trim_start_matches(WS);
        let v = if let Some(q) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut close = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => v.push(chars.next()?.1),
                    '"' => {
                        close = Some(i + 1);
                        break;
                    }
                    _ => v.push(c),
                }
            }
            rest = &q[close?..];
            v
        } else {
            let n = rest.find([';', ' ', '\t']).unwrap_or(rest.len());
            if n == 0 {
                return None;
            }
            let v = rest[..n].to_string();
            rest = &rest[n..];
            v
        };
        params.push((name.to_string(), v));
    }
    Some((head.trim_matches(WS), params))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURL_B: &str = "------------------------d74496d66958873e";

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// Uniform enough in `0..n` for tests.
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Hands out 1..=max bytes per read, and an `Interrupted` error now and then.
    struct Trickle<'a> {
        data: &'a [u8],
        pos: usize,
        rng: XorShift,
        max: usize,
    }

    impl<'a> Trickle<'a> {
        fn new(data: &'a [u8], seed: u64, max: usize) -> Self {
            Trickle {
                data,
                pos: 0,
                rng: XorShift(seed),
                max,
            }
        }
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.rng.below(16) == 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = (1 + self.rng.below(self.max))
                .min(out.len())
                .min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    /// What `curl -F name=value -F file=@X` sends; `filename` marks a file part.
    fn curl_body(b: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut v = Vec::new();
        for (name, filename, data) in parts {
            v.extend_from_slice(format!("--{b}\r\n").as_bytes());
            match filename {
                Some(f) => v.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                ),
                None => v.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                ),
            }
            v.extend_from_slice(data);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(format!("--{b}--\r\n").as_bytes());
        v
    }

    /// Every part's headers and data; read sizes vary with `rng`.
    fn read_all<R: Read>(
        mp: &mut Multipart<R>,
        rng: &mut XorShift,
    ) -> Result<Vec<(PartInfo, Vec<u8>)>> {
        let mut out = Vec::new();
        while let Some(info) = mp.next_part()? {
            let mut data = Vec::new();
            let mut r = mp.part_reader();
            let mut chunk = vec![0u8; 70_000];
            loop {
                let want = 1 + rng.below(chunk.len());
                match r.read(&mut chunk[..want]) {
                    Ok(0) => break,
                    Ok(n) => data.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(Error::io("part", e)),
                }
            }
            out.push((info, data));
        }
        Ok(out)
    }

    fn parse(body: &[u8], b: &str) -> Result<Vec<(PartInfo, Vec<u8>)>> {
        read_all(&mut Multipart::new(body, b), &mut XorShift(7))
    }

    fn data_of(parts: &[(PartInfo, Vec<u8>)]) -> Vec<(Option<&str>, &[u8])> {
        parts
            .iter()
            .map(|(i, d)| (i.name.as_deref(), d.as_slice()))
            .collect()
    }

    #[test]
    fn curl_file_first() {
        let body = curl_body(
            CURL_B,
            &[
                ("file", Some("disk.img"), b"\x00\x01disk bytes\r\n"),
                ("other", None, b"y"),
            ],
        );
        let ct = format!("multipart/form-data; boundary={CURL_B}");
        let b = boundary(&ct).unwrap();
        assert_eq!(b, CURL_B);
        let parts = parse(&body, &b).unwrap();
        assert_eq!(parts.len(), 2);
        let (info, data) = &parts[0];
        assert_eq!(info.name.as_deref(), Some("file"));
        assert_eq!(info.filename.as_deref(), Some("disk.img"));
        assert_eq!(
            info.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(info.headers.len(), 2);
        assert_eq!(data, b"\x00\x01disk bytes\r\n");
        assert_eq!(parts[1].0.name.as_deref(), Some("other"));
        assert_eq!(parts[1].0.filename, None);
        assert_eq!(parts[1].0.content_type, None);
        assert_eq!(parts[1].1, b"y");

        let mut mp = Multipart::new(&body[..], &b);
        let mut others = Vec::new();
        let mut r = find_field(&mut mp, "file", &mut |p| others.push(p.name.clone())).unwrap();
        assert_eq!(r.info().unwrap().filename.as_deref(), Some("disk.img"));
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"\x00\x01disk bytes\r\n");
        assert!(others.is_empty());
        // The rest of the form is still readable.
        assert_eq!(
            mp.next_part().unwrap().unwrap().name.as_deref(),
            Some("other")
        );
        assert_eq!(mp.next_part().unwrap(), None);
        assert_eq!(mp.next_part().unwrap(), None);
    }

    #[test]
    fn curl_file_after_other_parts() {
        let body = curl_body(
            CURL_B,
            &[
                ("other", None, b"y"),
                ("notes", Some("a.txt"), b"not the image"),
                ("file", Some("X"), b"image"),
                ("file", Some("second"), b"ignored"),
            ],
        );
        let mut mp = Multipart::new(Trickle::new(&body, 3, 5), CURL_B);
        let mut others = Vec::new();
        let mut r = find_field(&mut mp, "file", &mut |p| others.push(p.name.clone())).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"image");
        assert_eq!(others, [Some("other".into()), Some("notes".into())]);

        // No `file` part at all.
        let body = curl_body(CURL_B, &[("other", None, b"y")]);
        let mut mp = Multipart::new(&body[..], CURL_B);
        let mut n = 0;
        let e = find_field(&mut mp, "file", &mut |_| n += 1).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(e.message(), "no 'file' part in the form");
        assert_eq!(n, 1);
        // An empty form.
        let body = format!("--{CURL_B}--\r\n");
        let mut mp = Multipart::new(body.as_bytes(), CURL_B);
        assert_eq!(mp.next_part().unwrap(), None);
        let mut mp = Multipart::new(body.as_bytes(), CURL_B);
        assert!(find_field(&mut mp, "file", &mut |_| ()).is_err());
    }

    #[test]
    fn data_with_boundary_fragments() {
        let b = "bound";
        let tricky: &[&[u8]] = &[
            b"--bound",
            b"\r\n--",
            b"\r\n--boun",
            b"\r\n--boun\r\n--bound\x00",
            b"x\r\n--boundX",
            b"\r\n-bound\r\n",
            b"\r\r\n\n--bound",
            b"--bound--",
            b"\r",
            b"\r\n",
            b"\r\n-",
            b"\r\n--boun",
            b"",
        ];
        for data in tricky {
            for mine in [
                vec![("file", Some("d"), *data)],
                vec![("a", None, *data), ("file", Some("d"), *data)],
            ] {
                let body = curl_body(b, &mine);
                for max in [1, 2, 3, 7, 100] {
                    let mut mp = Multipart::new(Trickle::new(&body, 11, max), b);
                    let parts = read_all(&mut mp, &mut XorShift(max as u64)).unwrap();
                    let want: Vec<_> = mine.iter().map(|(n, _, d)| (Some(*n), *d)).collect();
                    assert_eq!(data_of(&parts), want, "{:?}", String::from_utf8_lossy(data));
                }
            }
        }
    }

    #[test]
    fn padding_preamble_epilogue_and_headerless_parts() {
        let body = b"This is the preamble.\r\nIt is to be ignored --b\r\n\
                     --b \t \r\n\r\nno headers\r\n--b\t\r\n\
                     Content-Disposition: form-data; name=file\r\n\r\n\
                     data\r\n--b--this is the epilogue\r\n--b\r\nmore";
        let parts = parse(body, "b").unwrap();
        assert_eq!(
            data_of(&parts),
            [(None, &b"no headers"[..]), (Some("file"), b"data")]
        );
        assert!(parts[0].0.headers.is_empty());
        // Nothing after the close is read, so it may be anything, even absent.
        let parts = parse(b"--b\r\n\r\nx\r\n--b--", "b").unwrap();
        assert_eq!(data_of(&parts), [(None, &b"x"[..])]);
        // A boundary that does not start a line is preamble.
        let parts = parse(b"x--b\r\n\r\nno\r\n--b\r\n\r\nyes\r\n--b--", "b").unwrap();
        assert_eq!(data_of(&parts), [(None, &b"yes"[..])]);
    }

    #[test]
    fn content_disposition_forms() {
        let body = b"--b\r\n\
                     content-disposition: Form-Data ; NAME = \"fi\\\"le\\\\\" ; \
                     filename*=UTF-8''x ; filename=\"C:\\\\d\\\\disk.img\"\r\n\
                     CONTENT-TYPE:text/plain;charset=utf-8  \r\n\
                     X-Other: \xff\r\n\r\n1\r\n\
                     --b\r\nContent-Disposition: form-data; name=file; filename=a.img\r\n\r\n2\r\n\
                     --b\r\nContent-Disposition: form-data;name=\"\";\r\n\r\n3\r\n\
                     --b--";
        let parts = parse(body, "b").unwrap();
        let i = &parts[0].0;
        assert_eq!(i.name.as_deref(), Some("fi\"le\\"));
        assert_eq!(i.filename.as_deref(), Some("C:\\d\\disk.img"));
        assert_eq!(i.content_type.as_deref(), Some("text/plain;charset=utf-8"));
        assert_eq!(i.header("x-other"), Some("\u{fffd}"));
        assert_eq!(parts[1].0.name.as_deref(), Some("file"));
        assert_eq!(parts[1].0.filename.as_deref(), Some("a.img"));
        assert_eq!(parts[2].0.name.as_deref(), Some(""));
        for bad in [
            "form-data; name=\"file",
            "form-data; name",
            "form-data; name=",
            "form-data; name=a b",
            "form-data; na me=a",
        ] {
            let body = format!("--b\r\nContent-Disposition: {bad}\r\n\r\nx\r\n--b--");
            let e = parse(body.as_bytes(), "b").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn malformed_framing_errors() {
        for body in [
            &b"--b\nContent-Disposition: form-data; name=file\r\n\r\nx\r\n--b--"[..],
            b"--b\r\nContent-Disposition: form-data; name=file\n\nx\r\n--b--",
            b"--b\r\nContent-Disposition: form-data;\r\n name=file\r\n\r\nx\r\n--b--",
            b"--b\r\nno colon\r\n\r\nx\r\n--b--",
            b"--b\r\n: empty name\r\n\r\nx\r\n--b--",
            b"--b\r\n\r\nx\r\n--b-x",
            b"--b x\r\n\r\nx\r\n--b--",
            b"--b\r\n\r\nx\r\n--b\n\r\nx\r\n--b--",
        ] {
            let e = parse(body, "b").unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::InvalidArgument,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn truncated_bodies_error() {
        // No closing delimiter: the part reader says UnexpectedEof after the data.
        let body = b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\npartial data";
        let mut mp = Multipart::new(&body[..], "b");
        let mut r = find_field(&mut mp, "file", &mut |_| ()).unwrap();
        let mut got = Vec::new();
        let e = r.read_to_end(&mut got).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(got, b"partial data");
        // The failure sticks.
        assert_eq!(r.read(&mut [0; 8]).unwrap_err().kind(), e.kind());
        let e = mp.next_part().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("before the closing boundary"), "{e}");

        // Cut inside the headers, and no boundary at all.
        let e = parse(b"--b\r\nContent-Disposition: form-da", "b").unwrap_err();
        assert!(e.message().contains("inside a part's headers"), "{e}");
        let e = parse(b"just some bytes\r\n--", "b").unwrap_err();
        assert!(e.message().contains("no boundary line"), "{e}");

        // Every proper prefix of a form that is cut before its closing `--` fails; the
        // prefixes with the close parse in full.
        let body = curl_body(
            "b",
            &[("other", None, b"y\r\n--"), ("file", Some("f"), b"\r")],
        );
        let close = body.len() - 2;
        let full = parse(&body, "b").unwrap();
        for cut in 0..body.len() {
            for max in [1, 3, 64] {
                let mut mp = Multipart::new(Trickle::new(&body[..cut], cut as u64 + 1, max), "b");
                let r = read_all(&mut mp, &mut XorShift(cut as u64 + 9));
                if cut < close {
                    assert!(r.is_err(), "cut {cut} parsed: {r:?}");
                } else {
                    assert_eq!(r.unwrap(), full);
                }
            }
        }
    }

    #[test]
    fn header_limits() {
        fn form(headers: &str) -> Vec<u8> {
            format!("--b\r\n{headers}\r\nx\r\n--b--").into_bytes()
        }
        // Block of exactly MAX_HEADER_BYTES (its empty line included) passes; one more fails.
        let prefix = "X-Pad: ";
        let fill = MAX_HEADER_BYTES - prefix.len() - 4;
        let ok = form(&format!("{prefix}{}\r\n", "a".repeat(fill)));
        let parts = parse(&ok, "b").unwrap();
        assert_eq!(parts[0].1, b"x");
        let big = form(&format!("{prefix}{}\r\n", "a".repeat(fill + 1)));
        let e = parse(&big, "b").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.message().contains("exceed"), "{e}");
        // Many MiB of header with no end is refused early, not buffered.
        let huge = form(&"a".repeat(4 << 20));
        assert!(parse(&huge, "b").is_err());

        let many = |n: usize| form(&"X-H: v\r\n".repeat(n));
        assert_eq!(
            parse(&many(MAX_PART_HEADERS), "b").unwrap()[0]
                .0
                .headers
                .len(),
            64
        );
        let e = parse(&many(MAX_PART_HEADERS + 1), "b").unwrap_err();
        assert!(e.message().contains("more than 64 headers"), "{e}");
    }

    /// Random bytes salted with pieces of the delimiter, never the delimiter itself.
    fn tricky_data(rng: &mut XorShift, b: &[u8], len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 80);
        while v.len() < len {
            match rng.below(6) {
                0 => {
                    v.extend_from_slice(b"\r\n--");
                    v.extend_from_slice(&b[..rng.below(b.len())]);
                }
                1 => v.extend_from_slice(b"\r\n"),
                2 => v.extend_from_slice(&b[..1 + rng.below(b.len())]),
                3 => v.push(b'-'),
                _ => {
                    for _ in 0..rng.below(200) {
                        v.push(rng.next() as u8);
                    }
                }
            }
        }
        v.truncate(len);
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(b);
        // Break any delimiter that formed by chance.
        while let Some(p) = find(&v, &delim) {
            v[p + 2] = b'x';
        }
        v
    }

    #[test]
    fn eight_mib_through_tiny_reads() {
        let b = CURL_B.as_bytes();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let data = tricky_data(&mut rng, b, 8 << 20);
        let body = curl_body(CURL_B, &[("other", None, b"y"), ("file", Some("X"), &data)]);
        let mut mp = Multipart::new(Trickle::new(&body, 42, 7), CURL_B);
        let mut r = find_field(&mut mp, "file", &mut |_| ()).unwrap();
        let mut got = Vec::with_capacity(data.len());
        let mut chunk = [0u8; 4096];
        loop {
            let want = 1 + rng.below(chunk.len());
            match r.read(&mut chunk[..want]).unwrap() {
                0 => break,
                n => got.extend_from_slice(&chunk[..n]),
            }
        }
        assert!(got == data, "data differs");
        assert_eq!(mp.next_part().unwrap(), None);
        // The buffer never grew.
        assert_eq!(mp.buf.len(), WINDOW + b.len() + 5);

        // The same through BufRead, and through large reads.
        let mut mp = Multipart::new(&body[..], CURL_B);
        let mut r = find_field(&mut mp, "file", &mut |_| ()).unwrap();
        let mut n = 0;
        loop {
            let buf = r.fill_buf().unwrap();
            if buf.is_empty() {
                break;
            }
            assert!(buf.len() <= WINDOW + b.len() + 5);
            assert_eq!(buf, &data[n..n + buf.len()]);
            let k = buf.len();
            n += k;
            r.consume(k);
        }
        assert_eq!(n, data.len());
    }

    /// Gives `data`, then fails like a stalled connection.
    struct Stall<'a>(&'a [u8]);

    impl Read for Stall<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            let n = self.0.read(out)?;
            Ok(n)
        }
    }

    #[test]
    fn streams_without_waiting_for_the_part_end() {
        let head = b"--b\r\nContent-Disposition: form-data; name=file\r\n\r\n";
        for (tail, certain) in [
            (&b"hello world"[..], &b"hello world"[..]),
            (b"hello\r\n--", b"hello"),
            (b"hello\r\n--b", b"hello"),
            (b"hello\r\n-b", b"hello\r\n-b"),
            (b"hello\r", b"hello"),
        ] {
            let body = [&head[..], tail].concat();
            let mut mp = Multipart::new(Stall(&body), "b");
            let mut r = find_field(&mut mp, "file", &mut |_| ()).unwrap();
            let mut got = Vec::new();
            let e = r.read_to_end(&mut got).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert_eq!(got, certain);
            // A reader error is not sticky and is an I/O error, not a malformed body.
            assert_eq!(r.read(&mut [0; 4]).unwrap_err().kind(), e.kind());
            assert_eq!(mp.next_part().unwrap_err().kind(), ErrorKind::Io);
        }
    }

    /// The inverse of the reader, for round trips.
    fn encode(b: &str, parts: &[(String, Vec<u8>)], preamble: &[u8], epilogue: &[u8]) -> Vec<u8> {
        let mut v = preamble.to_vec();
        if !preamble.is_empty() {
            v.extend_from_slice(b"\r\n");
        }
        for (k, (name, data)) in parts.iter().enumerate() {
            let pad = [" ", "\t", " \t "][k % 3].repeat(k % 2);
            v.extend_from_slice(format!("--{b}{pad}\r\n").as_bytes());
            v.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            );
            v.extend_from_slice(data);
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(format!("--{b}--").as_bytes());
        v.extend_from_slice(epilogue);
        v
    }

    #[test]
    fn random_forms_round_trip() {
        const BCHARS: &[u8] =
            b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ";
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for round in 0..300 {
            let blen = 1 + rng.below(MAX_BOUNDARY_LEN);
            let mut b: Vec<u8> = (0..blen).map(|_| BCHARS[rng.below(BCHARS.len())]).collect();
            if b.ends_with(b" ") {
                *b.last_mut().unwrap() = b'z';
            }
            let b = String::from_utf8(b).unwrap();
            assert_eq!(
                boundary(&format!("multipart/form-data; boundary=\"{b}\"")),
                Some(b.clone())
            );
            let parts: Vec<(String, Vec<u8>)> = (0..rng.below(5))
                .map(|k| {
                    let len = [0, 1, 10, 100, 5000, 70_000][rng.below(6)];
                    (format!("f{k}"), tricky_data(&mut rng, b.as_bytes(), len))
                })
                .collect();
            // The preamble must not hold a delimiter (with or without the first CRLF).
            let len = rng.below(300);
            let mut preamble = tricky_data(&mut rng, b.as_bytes(), len);
            if preamble.starts_with(format!("--{b}").as_bytes()) {
                preamble[0] = b'x';
            }
            let len = rng.below(300);
            let epilogue = tricky_data(&mut rng, b.as_bytes(), len);
            let body = encode(&b, &parts, &preamble, &epilogue);
            let max = [1, 7, 100, 100_000][round % 4];
            let mut mp = Multipart::new(Trickle::new(&body, round as u64 + 1, max), &b);
            let got = read_all(&mut mp, &mut rng).unwrap();
            let got: Vec<_> = got.into_iter().map(|(i, d)| (i.name.unwrap(), d)).collect();
            assert_eq!(got, parts, "round {round}, boundary {b:?}");
        }
    }

    #[test]
    fn boundary_parsing() {
        let cases: &[(&str, Option<&str>)] = &[
            ("multipart/form-data; boundary=abc", Some("abc")),
            ("multipart/form-data;boundary=abc", Some("abc")),
            ("Multipart/Form-Data; BOUNDARY=\"a b:c\"", Some("a b:c")),
            (
                "multipart/form-data; charset=utf-8; boundary=xyz; x=\"y;z\"",
                Some("xyz"),
            ),
            ("multipart/form-data; boundary=\"a\\\"b\"", Some("a\"b")),
            ("multipart/form-data ; boundary = abc ;", Some("abc")),
            (
                "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
                Some("----WebKitFormBoundary7MA4YWxkTrZu0gW"),
            ),
            (
                "multipart/form-data; boundary=abc; boundary=def",
                Some("abc"),
            ),
            ("multipart/mixed; boundary=abc", None),
            ("multipart/form-data", None),
            ("multipart/form-data; charset=utf-8", None),
            ("multipart/form-data; boundary=", None),
            ("multipart/form-data; boundary=\"\"", None),
            ("multipart/form-data; boundary=\"abc", None),
            ("multipart/form-data; boundary=\"abc \"", None),
            ("multipart/form-data; boundary=\"a\r\nb\"", None),
            ("multipart/form-data; boundary=a b", None),
            ("text/plain; boundary=abc", None),
            ("", None),
        ];
        for (ct, want) in cases {
            assert_eq!(boundary(ct).as_deref(), *want, "{ct:?}");
        }
        let b70 = "x".repeat(70);
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={b70}")),
            Some(b70.clone())
        );
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={b70}x")),
            None
        );
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={CURL_B}")).as_deref(),
            Some(CURL_B)
        );
    }

    #[test]
    fn search_helpers() {
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"xxabcd", b"abcd"), Some(2));
        assert_eq!(find(b"aab", b"ab"), Some(1));
        assert_eq!(partial_suffix(b"xx\r\n-", b"\r\n--b"), 3);
        assert_eq!(partial_suffix(b"\r\n--", b"\r\n--b"), 4);
        assert_eq!(partial_suffix(b"\r\n--b", b"\r\n--b"), 0);
        assert_eq!(partial_suffix(b"", b"\r\n--b"), 0);
    }
}
