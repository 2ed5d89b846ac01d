package standin

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring client, with raw system calls: one ring, one connect
// linked to a timeout. An application can connect this way without ever
// calling connect(2); the kernel still runs the cgroup connect hooks for it.

const (
	ioringOpLinkTimeout  = 15
	ioringOpConnect      = 16
	ioringEnterGetevents = 1
	ioringFeatSingleMmap = 1
	iosqeIOLink          = 1 << 2
	ioringOffSQRing      = 0
	ioringOffCQRing      = 0x8000000
	ioringOffSQEs        = 0x10000000
	sqeSize              = 64
	cqeSize              = 16
)

type ioSQRingOffsets struct {
	Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1 uint32
	UserAddr                                                        uint64
}

type ioCQRingOffsets struct {
	Head, Tail, RingMask, RingEntries, Overflow, CQEs, Flags, Resv1 uint32
	UserAddr                                                        uint64
}

type ioUringParams struct {
	SQEntries, CQEntries, Flags, SQThreadCPU, SQThreadIdle, Features, WQFd uint32
	Resv                                                                   [3]uint32
	SQOff                                                                  ioSQRingOffsets
	CQOff                                                                  ioCQRingOffsets
}

// rawSockaddr is the kernel's struct sockaddr_in or sockaddr_in6.
func rawSockaddr(sa unix.Sockaddr) []byte {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		b := make([]byte, unix.SizeofSockaddrInet4)
		binary.NativeEndian.PutUint16(b[0:], unix.AF_INET)
		binary.BigEndian.PutUint16(b[2:], uint16(a.Port))
		copy(b[4:8], a.Addr[:])
		return b
	case *unix.SockaddrInet6:
		b := make([]byte, unix.SizeofSockaddrInet6)
		binary.NativeEndian.PutUint16(b[0:], unix.AF_INET6)
		binary.BigEndian.PutUint16(b[2:], uint16(a.Port))
		copy(b[8:24], a.Addr[:])
		return b
	}
	return nil
}

// ErrIOUringUnavailable is returned when the kernel refuses to set up a ring
// (io_uring disabled by sysctl, seccomp, or not built in).
var ErrIOUringUnavailable = errors.New("io_uring unavailable")

// IOUringAvailable says whether this process may set up an io_uring.
func IOUringAvailable() error {
	var p ioUringParams
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&p)), 0)
	if e != 0 {
		return fmt.Errorf("%w: io_uring_setup: %v", ErrIOUringUnavailable, e)
	}
	unix.Close(int(fd))
	return nil
}

// ioUringConnect connects fd to sa with IORING_OP_CONNECT, bounded by timeout.
func ioUringConnect(fd int, sa unix.Sockaddr, timeout time.Duration) error {
	var p ioUringParams
	r, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, 4, uintptr(unsafe.Pointer(&p)), 0)
	if e != 0 {
		return fmt.Errorf("%w: io_uring_setup: %v", ErrIOUringUnavailable, e)
	}
	ring := int(r)
	defer unix.Close(ring)

	sqSize := int(p.SQOff.Array + p.SQEntries*4)
	cqSize := int(p.CQOff.CQEs + p.CQEntries*cqeSize)
	if p.Features&ioringFeatSingleMmap != 0 {
		sqSize = max(sqSize, cqSize)
	}
	sq, err := unix.Mmap(ring, ioringOffSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring sq ring: %w", err)
	}
	defer unix.Munmap(sq)
	cq := sq
	if p.Features&ioringFeatSingleMmap == 0 {
		if cq, err = unix.Mmap(ring, ioringOffCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
			return fmt.Errorf("io_uring cq ring: %w", err)
		}
		defer unix.Munmap(cq)
	}
	sqes, err := unix.Mmap(ring, ioringOffSQEs, int(p.SQEntries)*sqeSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring sqes: %w", err)
	}
	defer unix.Munmap(sqes)

	u32 := func(mem []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&mem[off])) }
	addr := rawSockaddr(sa)
	ts := unix.NsecToTimespec(timeout.Nanoseconds())

	// SQE 0: the connect, linked to SQE 1: its timeout.
	fill := func(i int, op uint8, flags uint8, sfd int32, off, ptr uint64, length uint32, user uint64) {
		b := sqes[i*sqeSize : (i+1)*sqeSize]
		clear(b)
		b[0], b[1] = op, flags
		binary.NativeEndian.PutUint32(b[4:], uint32(sfd))
		binary.NativeEndian.PutUint64(b[8:], off)
		binary.NativeEndian.PutUint64(b[16:], ptr)
		binary.NativeEndian.PutUint32(b[24:], length)
		binary.NativeEndian.PutUint64(b[32:], user)
	}
	fill(0, ioringOpConnect, iosqeIOLink, int32(fd), uint64(len(addr)), uint64(uintptr(unsafe.Pointer(&addr[0]))), 0, 1)
	fill(1, ioringOpLinkTimeout, 0, -1, 0, uint64(uintptr(unsafe.Pointer(&ts))), 1, 2)
	mask := atomic.LoadUint32(u32(sq, p.SQOff.RingMask))
	tail := atomic.LoadUint32(u32(sq, p.SQOff.Tail))
	for i := uint32(0); i < 2; i++ {
		atomic.StoreUint32(u32(sq, p.SQOff.Array+((tail+i)&mask)*4), i)
	}
	atomic.StoreUint32(u32(sq, p.SQOff.Tail), tail+2)

	res := map[uint64]int32{}
	for toSubmit := 2; len(res) < 2; toSubmit = 0 {
		// Submission comes before the wait: even interrupted, both are in.
		_, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(ring), uintptr(toSubmit), 1, ioringEnterGetevents, 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return fmt.Errorf("io_uring_enter: %w", e)
		}
		cmask := atomic.LoadUint32(u32(cq, p.CQOff.RingMask))
		for {
			head := atomic.LoadUint32(u32(cq, p.CQOff.Head))
			if head == atomic.LoadUint32(u32(cq, p.CQOff.Tail)) {
				break
			}
			c := cq[p.CQOff.CQEs+(head&cmask)*cqeSize:]
			res[binary.NativeEndian.Uint64(c[0:])] = int32(binary.NativeEndian.Uint32(c[8:]))
			atomic.StoreUint32(u32(cq, p.CQOff.Head), head+1)
		}
	}
	runtime.KeepAlive(addr)
	runtime.KeepAlive(&ts)
	switch r := res[1]; {
	case r == 0:
		return nil
	case r == -int32(unix.ECANCELED):
		return unix.ETIMEDOUT
	default:
		return unix.Errno(-r)
	}
}
