//! A tiny AML encoder (ACPI 6.5 chapter 20, "ACPI Machine Language Specification"): the terms
//! the DSDT needs (scopes, devices, named objects, one method with an `If`, `Notify`, packages,
//! buffers, integers, strings, EISA ids) and the two resource descriptors of a `_CRS`.
//!
//! Every function returns the encoded bytes of one term; a term's body is the concatenation of
//! its children's bytes.

/// Opcodes and prefixes (ACPI 6.5 §20.2.3 - §20.2.6).
mod op {
    pub const ZERO: u8 = 0x00;
    pub const ONE: u8 = 0x01;
    pub const NAME: u8 = 0x08;
    pub const BYTE_PREFIX: u8 = 0x0a;
    pub const WORD_PREFIX: u8 = 0x0b;
    pub const DWORD_PREFIX: u8 = 0x0c;
    pub const STRING_PREFIX: u8 = 0x0d;
    pub const QWORD_PREFIX: u8 = 0x0e;
    pub const SCOPE: u8 = 0x10;
    pub const BUFFER: u8 = 0x11;
    pub const PACKAGE: u8 = 0x12;
    pub const METHOD: u8 = 0x14;
    pub const DUAL_NAME_PREFIX: u8 = 0x2e;
    pub const MULTI_NAME_PREFIX: u8 = 0x2f;
    pub const EXT_PREFIX: u8 = 0x5b;
    /// After [`EXT_PREFIX`].
    pub const DEVICE: u8 = 0x82;
    pub const ROOT_CHAR: u8 = b'\\';
    pub const ARG0: u8 = 0x68;
    pub const NOTIFY: u8 = 0x86;
    pub const LEQUAL: u8 = 0x93;
    pub const IF: u8 = 0xa0;
}

/// Resource descriptor tags (ACPI 6.5 §6.4.2.5 I/O port, §6.4.2.9 end tag, §6.4.3.6 extended
/// interrupt).
mod res {
    /// Small item 0x08 (I/O port), 7 bytes long: 0x08 << 3 | 7.
    pub const IO_PORT: u8 = 0x47;
    /// I/O port information: the device decodes 16 address bits.
    pub const IO_DECODE_16: u8 = 1;
    pub const END_TAG: u8 = 0x79;
    /// Large item 0x06 (32-bit fixed memory range).
    pub const MEMORY32_FIXED: u8 = 0x86;
    /// Memory range information: read/write.
    pub const MEM_READ_WRITE: u8 = 1;
    pub const EXTENDED_INTERRUPT: u8 = 0x89;
    /// Extended interrupt flags: consumer, edge-triggered, active-low, shared.
    pub const INT_CONSUMER: u8 = 1 << 0;
    pub const INT_EDGE: u8 = 1 << 1;
    pub const INT_ACTIVE_LOW: u8 = 1 << 2;
}

/// Largest value a PkgLength can encode (§20.2.4: 28 bits).
const PKG_LENGTH_MAX: usize = (1 << 28) - 1;

/// PkgLength (§20.2.4) of a package whose contents after the PkgLength are `rest` bytes: the
/// encoded length counts its own bytes. One byte holds up to 63; longer lengths put the count
/// of following bytes in bits 7:6 of the lead byte, the low nibble in bits 3:0, and the rest in
/// the following bytes.
pub fn pkg_length(rest: usize) -> Vec<u8> {
    for n in 1..=4usize {
        let total = rest + n;
        let fits = match n {
            1 => total < 1 << 6,
            _ => total < 1 << (4 + 8 * (n - 1)),
        };
        if !fits {
            continue;
        }
        if n == 1 {
            return vec![total as u8];
        }
        let mut v = vec![(((n - 1) as u8) << 6) | (total & 0xf) as u8];
        for i in 0..n - 1 {
            v.push((total >> (4 + 8 * i)) as u8);
        }
        return v;
    }
    panic!("AML package of {rest} bytes is larger than PkgLength's {PKG_LENGTH_MAX}");
}

/// A NameSeg (§20.2.2): up to four characters, padded with `_`.
fn name_seg(seg: &str) -> [u8; 4] {
    assert!(
        !seg.is_empty()
            && seg.len() <= 4
            && seg
                .bytes()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_'),
        "bad AML name segment {seg:?}"
    );
    let mut s = [b'_'; 4];
    s[..seg.len()].copy_from_slice(seg.as_bytes());
    s
}

/// A NameString (§20.2.2): `\` for the root, then segments separated by `.`
/// (`"\\_SB.PWRB"`, `"_HID"`).
pub fn name_string(path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    let rel = match path.strip_prefix('\\') {
        Some(r) => {
            v.push(op::ROOT_CHAR);
            r
        }
        None => path,
    };
    let segs: Vec<[u8; 4]> = if rel.is_empty() {
        Vec::new()
    } else {
        rel.split('.').map(name_seg).collect()
    };
    match segs.len() {
        0 => v.push(0), // NullName
        1 => {}
        2 => v.push(op::DUAL_NAME_PREFIX),
        n => {
            v.push(op::MULTI_NAME_PREFIX);
            v.push(n as u8);
        }
    }
    for s in segs {
        v.extend_from_slice(&s);
    }
    v
}

/// An integer in its shortest encoding (§20.2.3: ZeroOp, OneOp, Byte/Word/DWord/QWordConst).
pub fn integer(value: u64) -> Vec<u8> {
    match value {
        0 => vec![op::ZERO],
        1 => vec![op::ONE],
        v if v <= 0xff => vec![op::BYTE_PREFIX, v as u8],
        v if v <= 0xffff => {
            let mut b = vec![op::WORD_PREFIX];
            b.extend_from_slice(&(v as u16).to_le_bytes());
            b
        }
        v if v <= 0xffff_ffff => dword(v as u32),
        v => {
            let mut b = vec![op::QWORD_PREFIX];
            b.extend_from_slice(&v.to_le_bytes());
            b
        }
    }
}

/// A DWordConst whatever the value.
fn dword(v: u32) -> Vec<u8> {
    let mut b = vec![op::DWORD_PREFIX];
    b.extend_from_slice(&v.to_le_bytes());
    b
}

/// A String (§20.2.3): ASCII, NUL-terminated.
pub fn string(s: &str) -> Vec<u8> {
    assert!(s.is_ascii() && !s.contains('\0'), "bad AML string {s:?}");
    let mut b = vec![op::STRING_PREFIX];
    b.extend_from_slice(s.as_bytes());
    b.push(0);
    b
}

/// A compressed EISA id (`EisaId("PNP0C0C")`, §19.6.35): three letters of five bits each and
/// four hex digits, big-endian, as a DWordConst.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    assert!(
        b.len() == 7
            && b[..3].iter().all(u8::is_ascii_uppercase)
            && b[3..].iter().all(u8::is_ascii_hexdigit),
        "bad EISA id {id:?}"
    );
    let letters = b[..3]
        .iter()
        .fold(0u16, |acc, c| (acc << 5) | u16::from(c - b'A' + 1));
    let digits = u16::from_str_radix(&id[3..], 16).expect("hex digits checked above");
    let mut be = [0u8; 4];
    be[..2].copy_from_slice(&letters.to_be_bytes());
    be[2..].copy_from_slice(&digits.to_be_bytes());
    dword(u32::from_le_bytes(be))
}

/// `opcode PkgLength body`.
fn with_pkg_length(opcode: &[u8], body: &[u8]) -> Vec<u8> {
    let mut v = opcode.to_vec();
    v.extend_from_slice(&pkg_length(body.len()));
    v.extend_from_slice(body);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `Name(path, data)` (§20.2.5.1 DefName).
pub fn name(path: &str, data: &[u8]) -> Vec<u8> {
    cat(&[&[op::NAME], &name_string(path), data])
}

/// `Scope(path) { body }` (§20.2.5.1 DefScope).
pub fn scope(path: &str, body: &[u8]) -> Vec<u8> {
    with_pkg_length(&[op::SCOPE], &cat(&[&name_string(path), body]))
}

/// `Device(path) { body }` (§20.2.5.2 DefDevice).
pub fn device(path: &str, body: &[u8]) -> Vec<u8> {
    with_pkg_length(
        &[op::EXT_PREFIX, op::DEVICE],
        &cat(&[&name_string(path), body]),
    )
}

/// `Method(path, args, NotSerialized) { body }` (§20.2.5.2 DefMethod; MethodFlags bits 2:0
/// are the argument count, bit 3 SerializeFlag, bits 7:4 SyncLevel).
pub fn method(path: &str, args: u8, body: &[u8]) -> Vec<u8> {
    assert!(args <= 7, "a method has at most 7 arguments");
    with_pkg_length(&[op::METHOD], &cat(&[&name_string(path), &[args], body]))
}

/// `If (predicate) { body }` (§20.2.5.3 DefIfElse, no Else).
pub fn if_(predicate: &[u8], body: &[u8]) -> Vec<u8> {
    with_pkg_length(&[op::IF], &cat(&[predicate, body]))
}

/// `LEqual(a, b)` (§20.2.5.4 DefLEqual).
pub fn lequal(a: &[u8], b: &[u8]) -> Vec<u8> {
    cat(&[&[op::LEQUAL], a, b])
}

/// `Notify(path, value)` (§20.2.5.3 DefNotify).
pub fn notify(path: &str, value: &[u8]) -> Vec<u8> {
    cat(&[&[op::NOTIFY], &name_string(path), value])
}

/// `ArgN` (§20.2.6.1).
pub fn arg(n: u8) -> Vec<u8> {
    assert!(n <= 6, "Arg0..Arg6");
    vec![op::ARG0 + n]
}

/// `Package() { elements }` (§20.2.5.4 DefPackage): NumElements, then each element's bytes.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let n = u8::try_from(elements.len()).expect("at most 255 package elements");
    let mut body = vec![n];
    for e in elements {
        body.extend_from_slice(e);
    }
    with_pkg_length(&[op::PACKAGE], &body)
}

/// `Buffer() { bytes }` (§20.2.5.4 DefBuffer): BufferSize as an integer, then the bytes.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    with_pkg_length(&[op::BUFFER], &cat(&[&integer(bytes.len() as u64), bytes]))
}

/// Trigger mode of an interrupt resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Edge-triggered.
    Edge,
    /// Level-triggered.
    Level,
}

/// An Extended Interrupt Descriptor (§6.4.3.6) for one GSI that the device consumes, active
/// high, exclusive, not wake-capable.
pub fn interrupt(gsi: u32, trigger: Trigger) -> Vec<u8> {
    let mut flags = res::INT_CONSUMER;
    if trigger == Trigger::Edge {
        flags |= res::INT_EDGE;
    }
    debug_assert_eq!(flags & res::INT_ACTIVE_LOW, 0);
    // Length after the 3-byte header: flags, table length, one 4-byte interrupt number.
    let mut d = vec![res::EXTENDED_INTERRUPT, 6, 0, flags, 1];
    d.extend_from_slice(&gsi.to_le_bytes());
    d
}

/// An I/O Port Descriptor (§6.4.2.5) for `len` ports fixed at `base` (minimum = maximum base,
/// 16-bit decode): ASL `IO (Decode16, base, base, 1, len)`.
pub fn io_port(base: u16, len: u8) -> Vec<u8> {
    let [lo, hi] = base.to_le_bytes();
    vec![res::IO_PORT, res::IO_DECODE_16, lo, hi, lo, hi, 1, len]
}

/// A 32-Bit Fixed Memory Range Descriptor (§6.4.3.4): `len` bytes at `base`, read/write: ASL
/// `Memory32Fixed (ReadWrite, base, len)`.
pub fn memory32_fixed(base: u32, len: u32) -> Vec<u8> {
    let mut d = vec![res::MEMORY32_FIXED, 9, 0, res::MEM_READ_WRITE];
    d.extend_from_slice(&base.to_le_bytes());
    d.extend_from_slice(&len.to_le_bytes());
    d
}

/// `ResourceTemplate() { descriptors }`: a buffer of the descriptors and the End Tag (§6.4.2.9;
/// checksum 0: "treat as correct").
pub fn resource_template(descriptors: &[Vec<u8>]) -> Vec<u8> {
    let mut b = descriptors.concat();
    b.extend_from_slice(&[res::END_TAG, 0]);
    buffer(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkg_length_counts_itself_and_grows_at_the_boundaries() {
        assert_eq!(pkg_length(0), vec![0x01]);
        assert_eq!(pkg_length(62), vec![0x3f]);
        // 63 + 1 = 64 does not fit one byte; 63 + 2 = 65 = 0x41 in two.
        assert_eq!(pkg_length(63), vec![0x41, 0x04]);
        assert_eq!(pkg_length(0xffd), vec![0x4f, 0xff]); // 0xfff
        assert_eq!(pkg_length(0xffe), vec![0x81, 0x00, 0x01]); // 0x1001 in three
        assert_eq!(pkg_length(0xf_fffc), vec![0x8f, 0xff, 0xff]); // 0xfffff
        assert_eq!(pkg_length(0xf_fffd), vec![0xc1, 0x00, 0x00, 0x01]); // 0x100001 in four
    }

    #[test]
    fn io_port_descriptor_is_the_asl_compilers() {
        // IO (Decode16, 0x03F8, 0x03F8, 0x01, 0x08) as iasl emits it.
        assert_eq!(
            io_port(0x3f8, 8),
            vec![0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        );
    }

    #[test]
    fn names() {
        assert_eq!(name_string("_HID"), b"_HID".to_vec());
        assert_eq!(name_string("GED"), b"GED_".to_vec());
        assert_eq!(name_string("\\_S5"), b"\\_S5_".to_vec());
        assert_eq!(name_string("\\_SB.PWRB"), b"\\\x2e_SB_PWRB".to_vec());
        assert_eq!(
            name_string("\\_SB.GED.XYZ"),
            b"\\\x2f\x03_SB_GED_XYZ_".to_vec()
        );
        assert_eq!(name_string("\\"), vec![b'\\', 0]);
    }

    #[test]
    #[should_panic(expected = "bad AML name segment")]
    fn lower_case_names_are_refused() {
        name_string("pwrb");
    }

    #[test]
    fn integers_take_the_shortest_form() {
        assert_eq!(integer(0), vec![0x00]);
        assert_eq!(integer(1), vec![0x01]);
        assert_eq!(integer(5), vec![0x0a, 0x05]);
        assert_eq!(integer(0x80), vec![0x0a, 0x80]);
        assert_eq!(integer(0x1234), vec![0x0b, 0x34, 0x12]);
        assert_eq!(integer(0x12_3456), vec![0x0c, 0x56, 0x34, 0x12, 0x00]);
        assert_eq!(integer(1 << 32), vec![0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(string("ACPI0013"), b"\x0dACPI0013\0".to_vec());
    }

    #[test]
    fn eisa_ids_match_the_well_known_values() {
        // PNP0C0C (power button) and PNP0A03 (PCI host bridge) as every firmware encodes them.
        assert_eq!(eisa_id("PNP0C0C"), dword(0x0c0c_d041));
        assert_eq!(eisa_id("PNP0A03"), dword(0x030a_d041));
        assert_eq!(eisa_id("PNP0C0C"), vec![0x0c, 0x41, 0xd0, 0x0c, 0x0c]);
    }

    #[test]
    fn a_device_with_a_hid() {
        // Device (PWRB) { Name (_HID, EisaId ("PNP0C0C")) }
        let d = device("PWRB", &name("_HID", &eisa_id("PNP0C0C")));
        let want: &[u8] = &[
            0x5b, 0x82, 0x0f, b'P', b'W', b'R', b'B', 0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41,
            0xd0, 0x0c, 0x0c,
        ];
        assert_eq!(d, want);
    }

    #[test]
    fn a_method_with_an_if_and_a_notify() {
        // Method (_EVT, 1) { If (Arg0 == 0x17) { Notify (\_SB.PWRB, 0x80) } }
        let m = method(
            "_EVT",
            1,
            &if_(
                &lequal(&arg(0), &integer(0x17)),
                &notify("\\_SB.PWRB", &integer(0x80)),
            ),
        );
        let notify_bytes: &[u8] = &[
            0x86, b'\\', 0x2e, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0a, 0x80,
        ];
        let mut if_bytes = vec![0xa0, 1 + 4 + 13, 0x93, 0x68, 0x0a, 0x17];
        if_bytes.extend_from_slice(notify_bytes);
        let mut want = vec![0x14, (1 + 4 + 1 + if_bytes.len()) as u8];
        want.extend_from_slice(b"_EVT");
        want.push(0x01);
        want.extend_from_slice(&if_bytes);
        assert_eq!(m, want);
    }

    #[test]
    fn packages_and_buffers() {
        // Name (\_S5, Package () { 5, 5, Zero, Zero })
        assert_eq!(
            name(
                "\\_S5",
                &package(&[integer(5), integer(5), integer(0), integer(0)])
            ),
            vec![
                0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05,
                0x00, 0x00
            ]
        );
        assert_eq!(
            buffer(&[0xaa, 0xbb]),
            vec![0x11, 0x05, 0x0a, 0x02, 0xaa, 0xbb]
        );
    }

    #[test]
    fn an_edge_interrupt_resource() {
        // ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 23 } }
        assert_eq!(
            resource_template(&[interrupt(23, Trigger::Edge)]),
            vec![
                0x11, 0x0e, 0x0a, 0x0b, // Buffer, PkgLength 14, size 11
                0x89, 0x06, 0x00, 0x03, 0x01, 23, 0, 0, 0, // extended interrupt
                0x79, 0x00, // end tag
            ]
        );
        assert_eq!(
            interrupt(9, Trigger::Level)[3],
            0x01,
            "level: consumer only"
        );
    }
}
