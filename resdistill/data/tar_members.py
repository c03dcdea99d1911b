"""Samples of a WebDataset tar shard, read with a hand-written header parser.

Why not ``tarfile``: webdataset's ``tar_file_expander`` builds a full ``TarInfo`` for every member
(more than decoding a small JPEG costs), and a sample holds one JPEG per magnification plus its
``json``, while a low-magnification student keeps only one small JPEG and the json. Here a header costs a few
slices and one checksum sum, and the bytes of unwanted members are skipped (``seek`` when the
stream can, else read and dropped in chunks) without being kept.

Contract of :func:`iter_samples`: the samples of webdataset's ``tar_file_expander`` +
``group_by_keys`` for our shards (same keys in the same order, same bytes per kept member), with
these deliberate differences: a sample none of whose members is wanted is still yielded, as
``{"__key__", "__url__"}`` (callers count samples); every damage raises
:class:`TarFormatError` where ``tarfile`` often just stops (a bad checksum or a truncated header
after the first member, data cut inside a skipped member; a negative or absurd size field,
named with its member, before any seek or allocation); compressed tars and empty streams
are refused (``tarfile`` refuses the latter too); pax global headers are ignored (``tarfile``
applies them to every later member).

Format handled: ustar headers (name, and the ``prefix`` field when the magic is ``ustar\\0``),
sizes in octal or GNU base-256, checksums unsigned or signed (as ``tarfile`` accepts), pax
extended headers (``path`` and ``size`` apply to the next member), GNU long names (``L``); files of
type ``0``, ``\\0`` and ``7`` are members, other types (directories, links, ...) are skipped. The
archive ends at a zero block, or at end of stream exactly at a header boundary.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Any, BinaryIO
from zlib import adler32

BLOCK = 512
#: largest pax header or GNU long name accepted; a bigger one is a damaged header, not a name
_MAX_META = 1 << 20
#: chunk for reading and dropping skipped data from a stream that cannot seek, and for reading
#: a member's data: memory follows the bytes that arrive, never the size a header claims
_DISCARD_CHUNK = 1 << 20
#: largest member size accepted (64 GiB, far above any tile): a bigger or a negative size field
#: is damage, refused before any seek or allocation (a negative one used to seek backwards and
#: read the same headers forever)
_MAX_MEMBER = 1 << 36
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = frozenset(b"07\0")
_PAX = frozenset(b"xX")  # 'X': Solaris' pax extended header, read by tarfile alike
_SKIPPED_META = frozenset(b"gK")  # pax global header, GNU long link name: nothing we use
_NO_DATA = frozenset(b"123456")  # hard link, symlink, char/block device, directory, fifo
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_META_NAME = re.compile(r"__[^/]*__($|/)")
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class TarFormatError(ValueError):
    """The stream is not a readable tar: bad checksum, truncated header or data, bad field.

    The message is one line naming the byte offset where reading stopped.
    """


def split_name(name: str) -> tuple[str | None, str | None]:
    """``(key, extension)`` of a member name: the path up to the first dot of the basename, and
    the rest (not lower-cased); ``(None, None)`` when the basename has no such dot.

    The same split as webdataset's ``base_plus_ext`` (its regex decides the rare odd names, such
    as a basename starting with a dot).
    """
    start = name.rfind("/") + 1
    dot = name.find(".", start)
    if dot > start:
        return name[:dot], name[dot + 1 :]
    match = _BASE_PLUS_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def _is_meta(name: str) -> bool:
    """Names webdataset's tar iterator skips as metadata (``__name__`` and ``__dir__/...``)."""
    if not name.startswith("__"):
        return False
    return ("/" not in name and name.endswith("__")) or _META_NAME.match(name) is not None


def _decode(raw: bytes) -> str:
    """Bytes of a name as ``tarfile`` decodes them: UTF-8, undecodable bytes kept as surrogates."""
    return raw.decode("utf-8", "surrogateescape")


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated field's bytes before its first NUL."""
    end = field.find(0)
    return field if end < 0 else field[:end]


def _number(field: bytes, what: str, offset: int) -> int:
    """A numeric header field: octal text (NUL or space padded), or GNU base-256 when the high bit
    of its first byte is set (0x80 positive, 0xff negative), as ``tarfile.nti`` reads it."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0xFF:
            value -= 256 ** (len(field) - 1)
        return value
    end = field.find(0)
    text = field if end < 0 else field[:end]
    try:
        return int(text, 8)  # int() itself ignores surrounding spaces
    except ValueError:
        if not text.strip():
            return 0
        raise TarFormatError(
            f"invalid {what} field {text!r} in the header at byte {offset}"
        ) from None


def _check_sum(header: bytes, offset: int) -> None:
    """Raise unless the header's checksum field matches the sum of its bytes (the field counted
    as spaces), unsigned or, as some old writers did, signed.

    The byte sum comes from adler32, whose low half is 1 + the sum of the bytes modulo 65521:
    exact for 256 bytes (at most 65280), and far cheaper than ``sum()`` over 512 ints.
    """
    field = header[148:156]
    stored = _number(field, "checksum", offset)
    total = (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - 2
    unsigned = total - sum(field) + 8 * 32
    if stored == unsigned:
        return
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b >= 128)
    if stored != signed:
        raise TarFormatError(f"bad header checksum at byte {offset}")


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """The ``"<len> <key>=<value>\\n"`` records of a pax extended header's data."""
    records: dict[str, str] = {}
    pos = 0
    while True:
        match = _PAX_RECORD.match(data, pos)
        if match is None:
            return records
        length = int(match.group(1))
        if length <= 0 or pos + length > len(data):
            raise TarFormatError(f"invalid pax record in the extended header at byte {offset}")
        value = data[match.end() : pos + length - 1]
        key = match.group(2).decode("utf-8", "surrogateescape")
        try:
            records[key] = value.decode("utf-8")
        except UnicodeDecodeError:
            records[key] = _decode(value)
        pos += length


class _TarReader:
    """The regular files of a tar stream, one at a time: :meth:`next_file` gives a file's name and
    size; its data is then read with :meth:`read_data` or left, and skipped by the next call.

    ``offset`` is the byte, from where reading started, of the next unread byte.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        seekable = getattr(stream, "seekable", None)
        self._seekable = bool(seekable()) if seekable is not None else False
        self._end = -1
        if self._seekable:
            start = stream.tell()
            self._end = stream.seek(0, 2) - start  # to catch data cut inside a skipped member
            stream.seek(start)
        self.offset = 0
        self._data_size = 0  # unread data bytes of the current file
        self._pad = 0  # padding after the current file's data

    def _read(self, n: int) -> bytes:
        """Up to ``n`` bytes, fewer only at end of stream (short reads of raw streams retried)."""
        buf = self._stream.read(n)
        if len(buf) < n and buf:
            parts = [buf]
            got = len(buf)
            while got < n:
                more = self._stream.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            buf = b"".join(parts)
        self.offset += len(buf)
        return buf

    def _skip(self, n: int, what: str) -> None:
        """Drop ``n`` bytes: a relative seek where the stream can, else reads in chunks. Never
        backwards: a negative ``n`` would re-read what was read, forever."""
        if n < 0:
            raise TarFormatError(f"negative {what} size {n} at byte {self.offset}")
        if self._seekable:
            if self.offset + n > self._end:
                raise TarFormatError(f"truncated {what} at byte {self._end}")
            self._stream.seek(n, 1)
            self.offset += n
            return
        left = n
        while left:
            got = len(self._read(min(left, _DISCARD_CHUNK)))
            if got == 0:
                raise TarFormatError(f"truncated {what} at byte {self.offset}")
            left -= got

    def read_data(self) -> bytes:
        """All data of the current file (once); its padding is skipped with the next header."""
        size = self._data_size
        start = self.offset
        if self._seekable and start + size > self._end:  # known short: allocate nothing
            raise TarFormatError(
                f"truncated member data at byte {self._end}: {self._end - start} of {size} "
                f"bytes from byte {start}"
            )
        if size <= _DISCARD_CHUNK:
            data = self._read(size)
        else:  # in chunks: a stream cut short costs what it held, not what the header claimed
            parts, got = [], 0
            while got < size and (part := self._read(min(_DISCARD_CHUNK, size - got))):
                parts.append(part)
                got += len(part)
            data = b"".join(parts)
        if len(data) != size:
            raise TarFormatError(
                f"truncated member data at byte {self.offset}: {len(data)} of {size} bytes "
                f"from byte {start}"
            )
        self._data_size = 0
        return data

    def _meta_data(self, size: int, what: str, offset: int) -> bytes:
        """The data of a pax header or GNU long name, its padding consumed."""
        if size > _MAX_META:
            raise TarFormatError(f"{what} at byte {offset} claims {size} bytes")
        self._data_size = size
        data = self.read_data()
        if size % BLOCK:
            self._skip(-size % BLOCK, "padding")
        return data

    def next_file(self) -> tuple[str, int] | None:
        """``(name, size)`` of the next regular file, or None at the end of the archive."""
        if self._data_size or self._pad:
            self._skip(self._data_size + self._pad, "member data")
            self._data_size = self._pad = 0
        name: str | None = None  # from a pax header or a GNU long name, for the next member
        size: int | None = None
        while True:
            at = self.offset
            header = self._read(BLOCK)
            if len(header) < BLOCK:
                if at == 0:
                    raise TarFormatError(f"not a tar archive: {len(header)} bytes")
                if header.count(0) == len(header):
                    if name is None and size is None:
                        return None  # clean end, or a cut inside the end-of-archive zeros
                    raise TarFormatError(
                        f"truncated archive after the extended header at byte {at}"
                    )
                raise TarFormatError(f"truncated header at byte {at}: {len(header)} of 512 bytes")
            if at == 0 and header[:2] == b"\x1f\x8b":
                raise TarFormatError("a gzip stream: compressed tars are not read")
            if header == _ZERO_BLOCK:
                if name is not None or size is not None:
                    raise TarFormatError(
                        f"end of archive right after the extended header at byte {at}"
                    )
                return None
            _check_sum(header, at)
            kind = header[156]
            own_size = _number(header[124:136], "size", at)
            if not 0 <= own_size <= _MAX_MEMBER:
                raise TarFormatError(
                    f"member {_decode(_cstr(header[0:100]))!r}: invalid size {own_size} in the "
                    f"header at byte {at}"
                )
            if kind in _PAX:
                records = _pax_records(self._meta_data(own_size, "pax header", at), at)
                if "path" in records:
                    name = records["path"]
                if "size" in records:
                    try:
                        size = int(records["size"])
                    except ValueError:
                        raise TarFormatError(
                            f"invalid pax size in the header at byte {at}"
                        ) from None
                continue
            if kind == 0x4C:  # 'L': GNU long name of the next member
                name = _decode(_cstr(self._meta_data(own_size, "GNU long name", at)))
                continue
            if kind in _SKIPPED_META:
                if own_size:
                    self._skip(own_size + (-own_size % BLOCK), "extended header")
                continue
            if kind == 0x53:  # 'S': the data is not the file's bytes
                raise TarFormatError(f"GNU sparse member at byte {at} is not supported")
            if name is None:
                name = _decode(_cstr(header[0:100]))
                if header[257:263] == b"ustar\0":
                    prefix = _cstr(header[345:500])
                    if prefix:
                        name = _decode(prefix) + "/" + name
            if size is None:
                size = own_size
            elif not 0 <= size <= _MAX_MEMBER:  # from a pax header
                raise TarFormatError(
                    f"member {name!r}: invalid pax size {size} in the extended header before "
                    f"byte {at}"
                )
            if kind in _REGULAR and not (kind == 0 and name.endswith("/")):  # not a directory
                self._data_size, self._pad = size, -size % BLOCK
                return name, size
            # other types: links, devices, fifos and directories carry no data (tarfile ignores
            # their size field); unknown types are skipped by their size, as tarfile does
            data_size = 0 if kind in _NO_DATA else size
            if data_size:
                self._skip(data_size + (-data_size % BLOCK), "member data")
            name = size = None


def iter_samples(stream: BinaryIO, wanted: Collection[str], url: str) -> Iterator[dict[str, Any]]:
    """Samples of the tar ``stream`` in tar order: ``{"__key__", "__url__", <ext>: bytes, ...}``.

    A member's key and extension split its name at the first dot of the basename
    (:func:`split_name`); the extension is lower-cased, and the member's bytes are kept only when
    it is in ``wanted``; others are skipped unread. Consecutive members with one key form a
    sample; a sample with no wanted member is yielded with its key and url alone. Members whose
    basename has no dot, and webdataset's ``__meta__`` names, belong to no sample. Raises
    :class:`TarFormatError` for a damaged tar and for a wanted extension twice in one sample.
    """
    reader = _TarReader(stream)
    sample: dict[str, Any] | None = None
    key_now: str | None = None
    while (member := reader.next_file()) is not None:
        name = member[0]
        if name.startswith("__") and _is_meta(name):
            continue
        start = name.rfind("/") + 1
        dot = name.find(".", start)
        if dot > start:  # the common case of split_name, inlined
            key, ext = name[:dot], name[dot + 1 :]
        else:
            key, ext = split_name(name)
            if key is None or ext is None:
                continue
        if key != key_now:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
            key_now = key
        ext = ext.lower()
        if ext in wanted:
            if ext in sample:  # type: ignore[operator]
                raise TarFormatError(f"duplicate member {name!r} in the tar (sample {key})")
            sample[ext] = reader.read_data()  # type: ignore[index]
    if sample is not None:
        yield sample
