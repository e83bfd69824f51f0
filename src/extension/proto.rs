//! The wire format of the Secrets Store CSI driver's provider API
//! (`sigs.k8s.io/secrets-store-csi-driver/provider/v1alpha1/service.proto`, package
//! `v1alpha1`, service `CSIDriverProvider`), written out by hand: seven small messages of
//! strings, bytes, an int32 and repeated sub-messages do not justify a code generator and
//! its build dependencies. Only protobuf's varint and length-delimited wire types occur;
//! anything else in a message is skipped as protobuf requires, and every length is checked
//! against what is left, so a malformed message is an error, never a panic.

/// `/v1alpha1.CSIDriverProvider/Version` and `/Mount`.
pub const VERSION_PATH: &str = "/v1alpha1.CSIDriverProvider/Version";
pub const MOUNT_PATH: &str = "/v1alpha1.CSIDriverProvider/Mount";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated message")]
    Truncated,
    #[error("varint longer than 10 bytes")]
    Varint,
    #[error("unsupported wire type {0}")]
    WireType(u64),
    #[error("field {0} is not valid UTF-8")]
    Utf8(u32),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionRequest {
    pub version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionResponse {
    pub version: String,
    pub runtime_name: String,
    pub runtime_version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectVersion {
    pub id: String,
    pub version: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountRequest {
    /// JSON map of the class's parameters plus the pod's attributes.
    pub attributes: String,
    /// JSON map of the nodePublishSecretRef Secret's data.
    pub secrets: String,
    pub target_path: String,
    /// JSON of the file mode, in decimal (`"420"` for 0644).
    pub permission: String,
    pub current_object_version: Vec<ObjectVersion>,
}

#[derive(Clone, Default, PartialEq, Eq)]
pub struct File {
    pub path: String,
    pub mode: i32,
    pub contents: Vec<u8>,
}

// Contents are secrets: never in a log line.
impl std::fmt::Debug for File {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("File")
            .field("path", &self.path)
            .field("mode", &self.mode)
            .field("contents", &format_args!("{} bytes", self.contents.len()))
            .finish()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountResponse {
    pub object_version: Vec<ObjectVersion>,
    /// `Error.code`, for the driver's metrics.
    pub error: Option<String>,
    pub files: Vec<File>,
}

// ---- encoding ----

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A sub-message is written even when empty (it is present).
fn put_message(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_int32(out: &mut Vec<u8>, field: u32, v: i32) {
    if v == 0 {
        return;
    }
    put_varint(out, u64::from(field) << 3);
    // Negative int32s are sign-extended to 64 bits, as protobuf does.
    put_varint(out, i64::from(v) as u64);
}

impl VersionRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, self.version.as_bytes());
        out
    }
}

impl VersionResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, self.version.as_bytes());
        put_bytes(&mut out, 2, self.runtime_name.as_bytes());
        put_bytes(&mut out, 3, self.runtime_version.as_bytes());
        out
    }
}

impl ObjectVersion {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, self.id.as_bytes());
        put_bytes(&mut out, 2, self.version.as_bytes());
        out
    }
}

impl File {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, self.path.as_bytes());
        put_int32(&mut out, 2, self.mode);
        put_bytes(&mut out, 3, &self.contents);
        out
    }
}

impl MountRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, self.attributes.as_bytes());
        put_bytes(&mut out, 2, self.secrets.as_bytes());
        put_bytes(&mut out, 3, self.target_path.as_bytes());
        put_bytes(&mut out, 4, self.permission.as_bytes());
        for v in &self.current_object_version {
            put_message(&mut out, 5, &v.encode());
        }
        out
    }
}

impl MountResponse {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for v in &self.object_version {
            put_message(&mut out, 1, &v.encode());
        }
        if let Some(code) = &self.error {
            let mut error = Vec::new();
            put_bytes(&mut error, 1, code.as_bytes());
            put_message(&mut out, 2, &error);
        }
        for f in &self.files {
            put_message(&mut out, 3, &f.encode());
        }
        out
    }
}

// ---- decoding ----

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Skipped,
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Truncated)?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(DecodeError::Varint)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError::Truncated)?;
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next field, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u32, Value<'a>)>, DecodeError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = (key >> 3) as u32;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?)
            }
            1 => {
                self.take(8)?;
                Value::Skipped
            }
            5 => {
                self.take(4)?;
                Value::Skipped
            }
            other => return Err(DecodeError::WireType(other)),
        };
        Ok(Some((number, value)))
    }
}

fn text(field: u32, bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8(field))
}

/// Calls `f` with every length-delimited field (number, bytes) and every varint; skips the
/// rest.
fn each<'a>(
    buf: &'a [u8],
    mut f: impl FnMut(u32, Value<'a>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let mut reader = Reader { buf };
    while let Some((number, value)) = reader.field()? {
        f(number, value)?;
    }
    Ok(())
}

impl VersionRequest {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Self::default();
        each(buf, |n, v| {
            if let (1, Value::Bytes(b)) = (n, v) {
                m.version = text(n, b)?;
            }
            Ok(())
        })?;
        Ok(m)
    }
}

impl VersionResponse {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Self::default();
        each(buf, |n, v| {
            match (n, v) {
                (1, Value::Bytes(b)) => m.version = text(n, b)?,
                (2, Value::Bytes(b)) => m.runtime_name = text(n, b)?,
                (3, Value::Bytes(b)) => m.runtime_version = text(n, b)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(m)
    }
}

impl ObjectVersion {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Self::default();
        each(buf, |n, v| {
            match (n, v) {
                (1, Value::Bytes(b)) => m.id = text(n, b)?,
                (2, Value::Bytes(b)) => m.version = text(n, b)?,
                _ => {}
            }
            Ok(())
        })?;
        Ok(m)
    }
}

impl File {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Self::default();
        each(buf, |n, v| {
            match (n, v) {
                (1, Value::Bytes(b)) => m.path = text(n, b)?,
                (2, Value::Varint(x)) => m.mode = x as i32,
                (3, Value::Bytes(b)) => m.contents = b.to_vec(),
                _ => {}
            }
            Ok(())
        })?;
        Ok(m)
    }
}

impl MountRequest {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Self::default();
        each(buf, |n, v| {
            match (n, v) {
                (1, Value::Bytes(b)) => m.attributes = text(n, b)?,
                (2, Value::Bytes(b)) => m.secrets = text(n, b)?,
                (3, Value::Bytes(b)) => m.target_path = text(n, b)?,
                (4, Value::Bytes(b)) => m.permission = text(n, b)?,
                (5, Value::Bytes(b)) => m.current_object_version.push(ObjectVersion::decode(b)?),
                _ => {}
            }
            Ok(())
        })?;
        Ok(m)
    }
}

impl MountResponse {
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Self::default();
        each(buf, |n, v| {
            match (n, v) {
                (1, Value::Bytes(b)) => m.object_version.push(ObjectVersion::decode(b)?),
                (2, Value::Bytes(b)) => {
                    let mut code = String::new();
                    each(b, |n, v| {
                        if let (1, Value::Bytes(c)) = (n, v) {
                            code = text(n, c)?;
                        }
                        Ok(())
                    })?;
                    m.error = Some(code);
                }
                (3, Value::Bytes(b)) => m.files.push(File::decode(b)?),
                _ => {}
            }
            Ok(())
        })?;
        Ok(m)
    }
}

/// gRPC's length-prefixed message: a zero (uncompressed) flag, the length as big-endian u32,
/// the message.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the gRPC message is truncated")]
    Truncated,
    #[error("compressed gRPC messages are not supported (no grpc-encoding was offered)")]
    Compressed,
    #[error("trailing bytes after the gRPC message")]
    Trailing,
}

/// The one message of a unary call's body.
pub fn unframe(body: &[u8]) -> Result<&[u8], FrameError> {
    if body.len() < 5 {
        return Err(FrameError::Truncated);
    }
    if body[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let rest = &body[5..];
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated),
        std::cmp::Ordering::Greater => Err(FrameError::Trailing),
        std::cmp::Ordering::Equal => Ok(rest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_protobuf_byte_for_byte() {
        // field 1, wire type 2 (0x0a), length 6, "v0.1.0"
        let request = VersionRequest {
            version: "v0.1.0".into(),
        };
        assert_eq!(request.encode(), b"\x0a\x06v0.1.0");
        // File{path "a", mode 420 (0x1a4 -> a4 03), contents "xy"}
        let file = File {
            path: "a".into(),
            mode: 420,
            contents: b"xy".to_vec(),
        };
        assert_eq!(file.encode(), b"\x0a\x01a\x10\xa4\x03\x1a\x02xy");
        let response = MountResponse {
            object_version: vec![ObjectVersion {
                id: "secret/s".into(),
                version: "1".into(),
            }],
            error: None,
            files: vec![file.clone()],
        };
        let encoded = response.encode();
        assert_eq!(encoded[0], 0x0a, "object_version is field 1");
        assert_eq!(MountResponse::decode(&encoded).unwrap(), response);
        let mount = MountRequest {
            attributes: "{}".into(),
            secrets: "{}".into(),
            target_path: "/t".into(),
            permission: "420".into(),
            current_object_version: vec![ObjectVersion::default()],
        };
        assert_eq!(MountRequest::decode(&mount.encode()).unwrap(), mount);
        assert_eq!(unframe(&frame(b"abc")).unwrap(), b"abc");
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert_eq!(
            MountRequest::decode(b"\x0a\x05ab"),
            Err(DecodeError::Truncated)
        );
        assert_eq!(MountRequest::decode(b"\x0b"), Err(DecodeError::WireType(3)));
        assert_eq!(
            MountRequest::decode(&[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            Err(DecodeError::Varint)
        );
        assert_eq!(
            MountRequest::decode(b"\x0a\x01\xff"),
            Err(DecodeError::Utf8(1))
        );
        // Unknown fields are skipped.
        assert!(MountRequest::decode(b"\x30\x01\x39\0\0\0\0\0\0\0\0").is_ok());
        assert_eq!(unframe(b"\x01\0\0\0\0"), Err(FrameError::Compressed));
        assert_eq!(unframe(b"\0\0\0\0\x02a"), Err(FrameError::Truncated));
        assert_eq!(unframe(b"\0\0"), Err(FrameError::Truncated));
    }
}
