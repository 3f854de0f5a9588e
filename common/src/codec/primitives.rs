//! The data representations of §1.5: integers, variable byte integers, UTF-8 strings,
//! binary data and string pairs — read from a [`Reader`] and written to a [`Sink`].
//!
//! Writing goes through the [`Sink`] trait so that one piece of code per packet serves both to
//! measure it ([`Counter`]) and to write it (`BytesMut`). The exact wire size (needed for the
//! remaining length, for reserving once, and for a client's Maximum Packet Size) can therefore
//! never disagree with what is written.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::{DecodeError, EncodeError};

/// Largest value a variable byte integer can hold (four bytes of seven bits).
pub const MAX_VAR_INT: u32 = 268_435_455;

/// Bytes needed to encode `v` as a variable byte integer (1..=4; 4 also for out-of-range
/// values, which fail elsewhere).
pub fn var_int_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Outcome of parsing a variable byte integer from the front of a slice.
pub enum VarInt {
    /// The value and how many bytes it used.
    Done(u32, usize),
    /// The slice ends before the last byte of the integer.
    Incomplete,
}

/// Parses a variable byte integer at the start of `buf` without consuming it.
///
/// More than four bytes is malformed (§1.5.5). So is a non-minimal encoding (a trailing `0x00`
/// continuation byte such as `80 00`): v5 requires the minimum number of bytes
/// [MQTT-1.5.5-1] and no real client produces anything else, so accepting it would only widen
/// the attack surface.
pub fn parse_var_int(buf: &[u8]) -> Result<VarInt, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(VarInt::Incomplete);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(DecodeError::MalformedPacket(
                    "non-minimal variable byte integer",
                ));
            }
            return Ok(VarInt::Done(value, i + 1));
        }
    }
    Err(DecodeError::MalformedPacket(
        "variable byte integer longer than 4 bytes",
    ))
}

/// A cursor over one packet's body. The body is a frozen `Bytes` split off the read buffer,
/// so binary fields and the PUBLISH payload are handed out as slices of it: no copies.
///
/// Every read checks the bounds; running out of bytes is a malformed packet, because the body is
/// only parsed once the whole remaining length has arrived.
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Reader {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Fails unless everything was consumed: bytes the remaining length covers but the packet
    /// grammar does not are malformed.
    pub fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::MalformedPacket(what))
        }
    }

    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.len() < n {
            Err(DecodeError::MalformedPacket(
                "packet shorter than its contents",
            ))
        } else {
            Ok(())
        }
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub fn var_int(&mut self) -> Result<u32, DecodeError> {
        match parse_var_int(&self.buf)? {
            VarInt::Done(v, n) => {
                self.buf.advance(n);
                Ok(v)
            }
            VarInt::Incomplete => Err(DecodeError::MalformedPacket(
                "truncated variable byte integer",
            )),
        }
    }

    /// The next `n` bytes as a zero-copy slice.
    pub fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }

    /// Everything left (the PUBLISH payload), zero-copy.
    pub fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Two-byte length followed by that many bytes (§1.5.6).
    pub fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    /// UTF-8 encoded string (§1.5.4): well-formed UTF-8 (which already excludes surrogates) and
    /// no U+0000. Other control characters and non-characters are only "SHOULD NOT" and pass.
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw)
            .map_err(|_| DecodeError::MalformedPacket("string is not valid UTF-8"))?;
        if raw.contains(&0) {
            return Err(DecodeError::MalformedPacket("string contains U+0000"));
        }
        Ok(s.to_owned())
    }

    /// A packet identifier, which must be non-zero wherever it appears [MQTT-2.2.1-3].
    pub fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ProtocolError("packet identifier 0")),
            id => Ok(id),
        }
    }
}

/// Where encoded bytes go: a [`Counter`] that only measures, or a `BytesMut`.
///
/// Validation that can fail (lengths, NUL characters, packet rules) reports through
/// [`Sink::fail`]. Encoding always measures first, so the `BytesMut` sink never sees a packet
/// that can fail and ignores failures.
pub trait Sink {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_slice(&mut self, s: &[u8]);
    fn fail(&mut self, e: EncodeError);

    fn put_var_int(&mut self, v: usize) {
        if v > MAX_VAR_INT as usize {
            self.fail(EncodeError::VarIntTooLarge(v as u64));
            // Keep the measured size plausible; the failure is what matters.
            self.put_slice(&[0xFF, 0xFF, 0xFF, 0x7F]);
            return;
        }
        let mut v = v;
        loop {
            let mut byte = (v & 0x7F) as u8;
            v >>= 7;
            if v > 0 {
                byte |= 0x80;
            }
            self.put_u8(byte);
            if v == 0 {
                break;
            }
        }
    }

    fn put_binary(&mut self, b: &[u8]) {
        if b.len() > u16::MAX as usize {
            self.fail(EncodeError::BinaryTooLong { len: b.len() });
        }
        self.put_u16(b.len() as u16);
        self.put_slice(b);
    }

    fn put_str(&mut self, s: &str) {
        if s.len() > u16::MAX as usize {
            self.fail(EncodeError::StringTooLong { len: s.len() });
        }
        if s.as_bytes().contains(&0) {
            self.fail(EncodeError::NulInString);
        }
        self.put_u16(s.len() as u16);
        self.put_slice(s.as_bytes());
    }
}

/// A sink that only adds up sizes and remembers the first failure.
#[derive(Debug, Default)]
pub struct Counter {
    pub len: usize,
    pub error: Option<EncodeError>,
}

impl Sink for Counter {
    fn put_u8(&mut self, _: u8) {
        self.len += 1;
    }
    fn put_u16(&mut self, _: u16) {
        self.len += 2;
    }
    fn put_u32(&mut self, _: u32) {
        self.len += 4;
    }
    fn put_slice(&mut self, s: &[u8]) {
        self.len += s.len();
    }
    fn put_var_int(&mut self, v: usize) {
        if v > MAX_VAR_INT as usize {
            self.fail(EncodeError::VarIntTooLarge(v as u64));
        }
        self.len += var_int_len(v);
    }
    fn put_binary(&mut self, b: &[u8]) {
        if b.len() > u16::MAX as usize {
            self.fail(EncodeError::BinaryTooLong { len: b.len() });
        }
        self.len += 2 + b.len();
    }
    fn fail(&mut self, e: EncodeError) {
        self.error.get_or_insert(e);
    }
}

impl Sink for BytesMut {
    fn put_u8(&mut self, v: u8) {
        BufMut::put_u8(self, v)
    }
    fn put_u16(&mut self, v: u16) {
        BufMut::put_u16(self, v)
    }
    fn put_u32(&mut self, v: u32) {
        BufMut::put_u32(self, v)
    }
    fn put_slice(&mut self, s: &[u8]) {
        self.extend_from_slice(s)
    }
    fn fail(&mut self, _: EncodeError) {}
}

/// Size of whatever `write` writes.
pub fn measure(write: impl FnOnce(&mut Counter)) -> usize {
    let mut c = Counter::default();
    write(&mut c);
    c.len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc_var(v: usize) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_var_int(v);
        b
    }

    #[test]
    fn var_int_boundaries_round_trip() {
        for (v, n) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (268_435_455, 4),
        ] {
            let b = enc_var(v);
            assert_eq!(b.len(), n, "{v}");
            assert_eq!(var_int_len(v), n);
            match parse_var_int(&b).unwrap() {
                VarInt::Done(got, used) => assert_eq!((got as usize, used), (v, n)),
                VarInt::Incomplete => panic!("incomplete"),
            }
        }
        assert_eq!(&enc_var(321)[..], &[0xC1, 0x02]);
    }

    #[test]
    fn var_int_rejects_five_bytes_and_non_minimal() {
        assert!(parse_var_int(&[0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).is_err());
        assert!(parse_var_int(&[0x80, 0x00]).is_err());
        assert!(matches!(
            parse_var_int(&[0x80, 0x80]),
            Ok(VarInt::Incomplete)
        ));
        assert!(matches!(parse_var_int(&[]), Ok(VarInt::Incomplete)));
    }

    #[test]
    fn var_int_too_large_fails_on_encode() {
        let mut c = Counter::default();
        c.put_var_int(MAX_VAR_INT as usize + 1);
        assert!(matches!(c.error, Some(EncodeError::VarIntTooLarge(_))));
    }

    #[test]
    fn strings_are_checked() {
        let mut r = Reader::new(Bytes::from_static(b"\x00\x03a\x00b"));
        assert!(r.string().is_err());
        let mut r = Reader::new(Bytes::from_static(b"\x00\x02\xC3\x28"));
        assert!(r.string().is_err());
        // An encoded surrogate (U+D800) is not valid UTF-8.
        let mut r = Reader::new(Bytes::from_static(b"\x00\x03\xED\xA0\x80"));
        assert!(r.string().is_err());
        let mut r = Reader::new(Bytes::from_static(b"\x00\x05h\xC3\xA9y!"));
        assert_eq!(r.string().unwrap(), "héy!");
        let mut r = Reader::new(Bytes::from_static(b"\x00\x05abc"));
        assert!(r.string().is_err());
        let mut c = Counter::default();
        c.put_str("a\0b");
        assert!(matches!(c.error, Some(EncodeError::NulInString)));
        let long = "x".repeat(65_536);
        let mut c = Counter::default();
        c.put_str(&long);
        assert!(matches!(
            c.error,
            Some(EncodeError::StringTooLong { len: 65_536 })
        ));
    }

    #[test]
    fn integers_and_binary() {
        let mut b = BytesMut::new();
        Sink::put_u16(&mut b, 0xBEEF);
        Sink::put_u32(&mut b, 0xDEAD_BEEF);
        b.put_binary(b"xyz");
        assert_eq!(
            b.len(),
            measure(|c| {
                c.put_u16(0);
                c.put_u32(0);
                c.put_binary(b"xyz");
            })
        );
        let mut r = Reader::new(b.freeze());
        assert_eq!(r.u16().unwrap(), 0xBEEF);
        assert_eq!(r.u32().unwrap(), 0xDEAD_BEEF);
        assert_eq!(&r.binary().unwrap()[..], b"xyz");
        assert!(r.finish("x").is_ok());
        assert!(r.u8().is_err());
        let mut r = Reader::new(Bytes::from_static(&[0, 0]));
        assert!(matches!(r.packet_id(), Err(DecodeError::ProtocolError(_))));
    }
}
