//! RFC 6455 frames without IO, as both ends see them: the relay's splice parses the headers a
//! client sent, checks them against the rules a server must enforce and re-encodes them the
//! way a server writes them (unmasked); the tunnel's byte stream ([`super::WsStream`]) checks
//! the relay's frames against the rules a client enforces and writes its own masked. Payloads
//! are never held here: each side streams them through its own buffer, (un)masking with
//! [`apply_mask`].
//!
//! No extension is ever negotiated (the relay answers upgrades without
//! `Sec-WebSocket-Extensions`, and our clients ask for none), so reserved bits are always a
//! protocol error.

/// The longest header: 2 bytes, a 64-bit length, a 4-byte masking key.
pub const MAX_HEADER: usize = 14;

/// The longest header the relay writes (unmasked): 2 bytes and a 64-bit length.
pub const MAX_SERVER_HEADER: usize = 10;

/// RFC 6455 5.5: control frames carry at most 125 bytes.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Close codes the relay itself sends.
pub mod close_code {
    /// The exchange is over (an HTTP request's rendezvous, once its response has ended).
    pub const NORMAL: u16 = 1000;
    /// The other side went away (closed its connection without a close frame, or failed).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke RFC 6455.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// Policy: used when the relay revokes a rendezvous.
    pub const POLICY: u16 = 1008;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Opcode {
    fn from_bits(bits: u8) -> Option<Opcode> {
        Some(match bits {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    pub fn bits(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, Opcode::Close | Opcode::Ping | Opcode::Pong)
    }
}

/// One frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: Opcode,
    /// The masking key; every frame from a client has one.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub len: u64,
}

/// A frame that breaks RFC 6455; the relay answers each with close code 1002.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("64-bit payload length with the most significant bit set")]
    LengthTopBit,
    #[error("fragmented control frame")]
    FragmentedControl,
    #[error("control frame with a {0}-byte payload (at most 125)")]
    ControlTooLong(u64),
    #[error("close frame with a 1-byte payload")]
    CloseOneByte,
    #[error("unmasked frame from a client")]
    Unmasked,
    #[error("masked frame from a server")]
    Masked,
    #[error("continuation frame outside a fragmented message")]
    UnexpectedContinuation,
    #[error("new data frame before the fragmented message ended")]
    ExpectedContinuation,
}

/// Parses the header at the start of `buf`: `Ok(None)` until `buf` holds all of it, then the
/// header and its length in bytes. Rules that need only the header are checked here; those
/// that depend on the connection (masking, fragmentation) by [`Sequence::check`].
pub fn parse_header(buf: &[u8]) -> Result<Option<(Header, usize)>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = Opcode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            let Some(ext) = buf.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4)
        }
        127 => {
            let Some(ext) = buf.get(2..10).and_then(|e| <[u8; 8]>::try_from(e).ok()) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(ext);
            if len >> 63 != 0 {
                return Err(FrameError::LengthTopBit);
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    if opcode.is_control() {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(FrameError::ControlTooLong(len));
        }
        if opcode == Opcode::Close && len == 1 {
            return Err(FrameError::CloseOneByte);
        }
    }
    let mask = if masked {
        let Some(key) = buf
            .get(at..at + 4)
            .and_then(|k| <[u8; 4]>::try_from(k).ok())
        else {
            return Ok(None);
        };
        at += 4;
        Some(key)
    } else {
        None
    };
    Ok(Some((
        Header {
            fin,
            opcode,
            mask,
            len,
        },
        at,
    )))
}

/// Where one side's frames are in a message: RFC 6455 5.4 lets control frames come between
/// the fragments of a message, and nothing else.
#[derive(Debug, Default)]
pub struct Sequence {
    in_message: bool,
}

impl Sequence {
    /// Checks the next frame from a client and moves along the message it belongs to.
    pub fn check(&mut self, header: &Header) -> Result<(), FrameError> {
        if header.mask.is_none() {
            return Err(FrameError::Unmasked);
        }
        self.follow(header)
    }

    /// The same for a frame from a server, which must not be masked (RFC 6455 5.1).
    pub fn check_from_server(&mut self, header: &Header) -> Result<(), FrameError> {
        if header.mask.is_some() {
            return Err(FrameError::Masked);
        }
        self.follow(header)
    }

    fn follow(&mut self, header: &Header) -> Result<(), FrameError> {
        match header.opcode {
            op if op.is_control() => {}
            Opcode::Continuation if !self.in_message => {
                return Err(FrameError::UnexpectedContinuation)
            }
            Opcode::Continuation => self.in_message = !header.fin,
            _ if self.in_message => return Err(FrameError::ExpectedContinuation),
            _ => self.in_message = !header.fin,
        }
        Ok(())
    }
}

/// Length of the unmasked header for a `len`-byte payload.
pub fn server_header_len(len: u64) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Writes the unmasked header of a frame so that it ends exactly at the end of `out` (the
/// splice puts it right before the payload already in its buffer, so header and payload go
/// out in one write). Returns the header's length. `out` must hold at least
/// [`server_header_len`] bytes.
pub fn write_server_header(out: &mut [u8], fin: bool, opcode: Opcode, len: u64) -> usize {
    let n = server_header_len(len);
    let start = out.len() - n;
    let h = &mut out[start..];
    h[0] = if fin { 0x80 } else { 0 } | opcode.bits();
    match n {
        2 => h[1] = len as u8,
        4 => {
            h[1] = 126;
            h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h[1] = 127;
            h[2..10].copy_from_slice(&len.to_be_bytes());
        }
    }
    n
}

/// Appends a client's (masked) header for a final frame of `len` payload bytes to `out`; the
/// payload that follows must be masked with `key` from offset 0.
pub fn push_client_header(out: &mut Vec<u8>, opcode: Opcode, len: u64, key: [u8; 4]) {
    let mut header = [0u8; MAX_HEADER];
    let n = server_header_len(len);
    write_server_header(&mut header[..n], true, opcode, len);
    header[1] |= 0x80;
    header[n..n + 4].copy_from_slice(&key);
    out.extend_from_slice(&header[..n + 4]);
}

/// The length of the header that starts with `first_two` bytes: what to read before
/// [`parse_header`] can answer.
pub fn header_len(first_two: [u8; 2]) -> usize {
    let masked = if first_two[1] & 0x80 != 0 { 4 } else { 0 };
    let extended = match first_two[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + extended + masked
}

/// A complete close frame from the relay (unmasked) with `code` and `reason` (cut to fit the
/// 125-byte limit at a character boundary) written to `out`; returns its length.
pub fn write_close(out: &mut [u8; 2 + MAX_CONTROL_PAYLOAD], code: u16, reason: &str) -> usize {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let payload = 2 + cut;
    out[0] = 0x80 | Opcode::Close.bits();
    out[1] = payload as u8;
    out[2..4].copy_from_slice(&code.to_be_bytes());
    out[4..4 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    2 + payload
}

/// XORs `data` with `key` in place, `data` being the part of a payload that starts `offset`
/// bytes into it (so a payload can be unmasked piece by piece). Eight bytes at a time.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: u64) {
    let shift = (offset % 4) as usize;
    let key = [
        key[shift],
        key[(shift + 1) % 4],
        key[(shift + 2) % 4],
        key[(shift + 3) % 4],
    ];
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(bytes) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    // Whole chunks are a multiple of four bytes: the rest starts at the key's first byte.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn masked_header(b0: u8, len: u64) -> Vec<u8> {
        let mut v = vec![b0];
        match len {
            0..=125 => v.push(0x80 | len as u8),
            126..=0xFFFF => {
                v.push(0x80 | 126);
                v.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                v.push(0x80 | 127);
                v.extend_from_slice(&len.to_be_bytes());
            }
        }
        v.extend_from_slice(&KEY);
        v
    }

    fn naive_mask(data: &[u8], key: [u8; 4], offset: usize) -> Vec<u8> {
        data.iter()
            .enumerate()
            .map(|(i, b)| b ^ key[(i + offset) % 4])
            .collect()
    }

    #[test]
    fn parses_7_16_and_64_bit_lengths_and_needs_every_byte() {
        for len in [
            0u64,
            1,
            125,
            126,
            127,
            0xFFFF,
            0x1_0000,
            14 << 20,
            (1 << 63) - 1,
        ] {
            let bytes = masked_header(0x82, len);
            for cut in 0..bytes.len() {
                assert_eq!(parse_header(&bytes[..cut]), Ok(None), "len {len} cut {cut}");
            }
            let (h, n) = parse_header(&bytes).unwrap().unwrap();
            assert_eq!(n, bytes.len());
            assert_eq!(
                h,
                Header {
                    fin: true,
                    opcode: Opcode::Binary,
                    mask: Some(KEY),
                    len
                }
            );
            // Trailing payload bytes are not part of the header.
            let mut more = bytes.clone();
            more.extend_from_slice(b"payload");
            assert_eq!(parse_header(&more).unwrap().unwrap().1, bytes.len());
        }
        // The real wire form of "Hello" from RFC 6455 5.7.
        let hello = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (h, n) = parse_header(&hello).unwrap().unwrap();
        assert_eq!((h.opcode, h.len, n), (Opcode::Text, 5, 6));
        let mut payload = hello[6..].to_vec();
        apply_mask(&mut payload, h.mask.unwrap(), 0);
        assert_eq!(payload, b"Hello");
        // Unmasked frames parse (a server's), the sequence check refuses them from a client.
        let (h, n) = parse_header(&[0x82, 0x03, 1, 2, 3]).unwrap().unwrap();
        assert_eq!((h.mask, h.len, n), (None, 3, 2));
    }

    #[test]
    fn client_headers_parse_back_and_say_their_own_length() {
        for len in [0u64, 9, 125, 126, 0xFFFF, 0x1_0000, 64 << 10] {
            let mut out = vec![b'x'];
            push_client_header(&mut out, Opcode::Binary, len, KEY);
            let header = &out[1..];
            assert_eq!(header, masked_header(0x82, len), "len {len}");
            assert_eq!(header_len([header[0], header[1]]), header.len());
        }
        // The header of a server's frame is as long as its length form, without a key.
        assert_eq!(header_len([0x82, 5]), 2);
        assert_eq!(header_len([0x82, 126]), 4);
        assert_eq!(header_len([0x82, 127]), 10);
        let (from_server, _) = parse_header(&[0x82, 5]).unwrap().unwrap();
        let (from_client, _) = parse_header(&masked_header(0x82, 5)).unwrap().unwrap();
        let mut seq = Sequence::default();
        assert_eq!(seq.check_from_server(&from_server), Ok(()));
        assert_eq!(seq.check_from_server(&from_client), Err(FrameError::Masked));
    }

    #[test]
    fn protocol_errors_are_named() {
        assert_eq!(
            parse_header(&[0xC2, 0x80]),
            Err(FrameError::ReservedBits),
            "RSV1 (permessage-deflate) was never negotiated"
        );
        assert_eq!(parse_header(&[0xA2, 0x80]), Err(FrameError::ReservedBits));
        assert_eq!(parse_header(&[0x92, 0x80]), Err(FrameError::ReservedBits));
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(
                parse_header(&[0x80 | op, 0x80]),
                Err(FrameError::UnknownOpcode(op))
            );
        }
        let mut top = vec![0x82, 0xFF];
        top.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&top), Err(FrameError::LengthTopBit));
        assert_eq!(
            parse_header(&[0x09, 0x80]),
            Err(FrameError::FragmentedControl)
        );
        assert_eq!(
            parse_header(&masked_header(0x89, 126)),
            Err(FrameError::ControlTooLong(126))
        );
        assert_eq!(
            parse_header(&masked_header(0x88, 1)),
            Err(FrameError::CloseOneByte)
        );
        // 125 bytes is the most a control frame may carry.
        assert!(parse_header(&masked_header(0x8A, 125)).unwrap().is_some());
    }

    #[test]
    fn fragmented_messages_may_carry_control_frames_between_fragments() {
        let frame = |b0: u8| parse_header(&masked_header(b0, 3)).unwrap().unwrap().0;
        let mut seq = Sequence::default();
        // Text in three fragments with a ping and a pong between them, then a whole binary.
        for b0 in [0x01, 0x89, 0x00, 0x8A, 0x80, 0x82] {
            assert_eq!(seq.check(&frame(b0)), Ok(()), "{b0:#x}");
        }
        let mut seq = Sequence::default();
        assert_eq!(
            seq.check(&frame(0x80)),
            Err(FrameError::UnexpectedContinuation)
        );
        let mut seq = Sequence::default();
        seq.check(&frame(0x02)).unwrap();
        assert_eq!(
            seq.check(&frame(0x81)),
            Err(FrameError::ExpectedContinuation)
        );
        let unmasked = parse_header(&[0x82, 0x00]).unwrap().unwrap().0;
        assert_eq!(
            Sequence::default().check(&unmasked),
            Err(FrameError::Unmasked)
        );
    }

    #[test]
    fn server_headers_use_the_shortest_length_form_and_end_where_asked() {
        for (len, fin, op, want) in [
            (0u64, true, Opcode::Pong, vec![0x8A, 0]),
            (125, false, Opcode::Text, vec![0x01, 125]),
            (126, true, Opcode::Binary, vec![0x82, 126, 0, 126]),
            (
                0xFFFF,
                false,
                Opcode::Continuation,
                vec![0x00, 126, 0xFF, 0xFF],
            ),
            (
                0x1_0000,
                true,
                Opcode::Binary,
                vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0],
            ),
        ] {
            let mut out = [0xEEu8; 16];
            let n = write_server_header(&mut out, fin, op, len);
            assert_eq!(n, want.len());
            assert_eq!(&out[16 - n..], &want[..]);
            assert!(
                out[..16 - n].iter().all(|b| *b == 0xEE),
                "wrote only its own bytes"
            );
            // What the relay writes parses back to the same frame, unmasked.
            let (h, hn) = parse_header(&out[16 - n..]).unwrap().unwrap();
            assert_eq!(
                (h.fin, h.opcode, h.mask, h.len, hn),
                (fin, op, None, len, n)
            );
        }
    }

    #[test]
    fn close_frames_carry_code_and_a_reason_cut_to_fit() {
        let mut out = [0u8; 127];
        let n = write_close(&mut out, close_code::POLICY, "revoked");
        assert_eq!(&out[..n], b"\x88\x09\x03\xF0revoked");
        let long = "é".repeat(100);
        let n = write_close(&mut out, close_code::GOING_AWAY, &long);
        let (h, hn) = parse_header(&out[..n]).unwrap().unwrap();
        assert!(h.len <= 125);
        assert_eq!(hn + h.len as usize, n);
        assert!(
            std::str::from_utf8(&out[4..n]).is_ok(),
            "cut at a character"
        );
    }

    #[test]
    fn masking_in_pieces_at_any_offset_matches_the_byte_by_byte_definition() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0usize, 1, 3, 4, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000] {
            let mut whole = data[..len].to_vec();
            apply_mask(&mut whole, KEY, 0);
            assert_eq!(whole, naive_mask(&data[..len], KEY, 0), "len {len}");
        }
        // Split one payload at awkward places: each piece knows where it starts.
        for splits in [[1usize, 2, 5], [3, 11, 12], [8, 16, 999], [0, 0, 1000]] {
            let mut buf = data.clone();
            let mut at = 0;
            for end in splits.into_iter().chain([1000]) {
                apply_mask(&mut buf[at..end], KEY, at as u64);
                at = end;
            }
            assert_eq!(buf, naive_mask(&data, KEY, 0), "{splits:?}");
        }
        // Masking twice gives the original back.
        let mut twice = data.clone();
        apply_mask(&mut twice[5..], KEY, 5);
        apply_mask(&mut twice[5..], KEY, 5);
        assert_eq!(twice, data);
    }
}
