package podnet

import (
	"encoding/binary"
	"unsafe"

	"golang.org/x/sys/unix"
)

func getsockoptBytes(fd, level, opt int, buf []byte) error {
	l := uint32(len(buf))
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return e
	}
	return nil
}

func nativeUint64(b []byte) uint64 { return binary.NativeEndian.Uint64(b) }
