"""Python (ctypes) use of libvdisk.so: open, size, format, convert, error message.
Run by scripts/c-test.sh as: python3 ctypes_smoke.py LIBVDISK_SO IMAGE OUTDIR."""
import ctypes as C
import sys

lib = C.CDLL(sys.argv[1])
img, out = sys.argv[2].encode(), (sys.argv[3] + "/py.raw").encode()
lib.vdisk_image_virtual_size.restype = C.c_uint64
lib.vdisk_image_format_name.restype = C.c_char_p
h, err = C.c_void_p(), C.c_void_p()
assert lib.vdisk_image_open(img, 1, C.byref(h), C.byref(err)) == 0
assert lib.vdisk_image_virtual_size(h) == 8 << 20
assert lib.vdisk_image_format_name(h) == b"qcow2"
lib.vdisk_image_free(h)
assert lib.vdisk_convert(img, out, None, None) == 0
assert lib.vdisk_convert(b"/nonexistent.qcow2", out, None, C.byref(err)) == 10  # NOT_FOUND
buf = C.create_string_buffer(512)
lib.vdisk_error_message(err, buf, C.c_size_t(512))
assert b"/nonexistent.qcow2" in buf.value, buf.value
lib.vdisk_error_free(err)
print("python ctypes test: 1 passed, 0 failed")
