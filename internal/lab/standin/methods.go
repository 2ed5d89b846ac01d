package standin

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// connectBy connects fd to o.dst the way o.method says and returns the
// socket's names as the application would read them right after its connect
// call. Blocking methods are bounded by SO_SNDTIMEO, which makes a blocking
// connect give up with EINPROGRESS.
func connectBy(fd, family int, o connectOpts) (local, peer string, err error) {
	sa := sockaddrFor(family, o.dst)
	if blockingMethod(o.method) {
		tv := unix.NsecToTimeval(o.timeout.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err != nil {
			return "", "", fmt.Errorf("SO_SNDTIMEO: %w", err)
		}
	}
	timedOut := func(err error) error {
		if errors.Is(err, unix.EINPROGRESS) || errors.Is(err, unix.EAGAIN) {
			return unix.ETIMEDOUT
		}
		return err
	}
	switch o.method {
	case "", MethodNonblocking:
		err = unix.Connect(fd, sa)
		if errors.Is(err, unix.EINPROGRESS) {
			err = waitConnected(fd, o.timeout)
		}
	case MethodBlocking:
		err = timedOut(unix.Connect(fd, sa))
	case MethodTFOSendto:
		// The connect happens inside sendto; the data rides in the SYN when a
		// cookie is cached, else right after the handshake.
		err = timedOut(unix.Sendto(fd, o.first, unix.MSG_FASTOPEN, sa))
	case MethodTFOConnect:
		// connect() returns at once and the SYN waits for the first write.
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_FASTOPEN_CONNECT, 1); err != nil {
			return "", "", fmt.Errorf("TCP_FASTOPEN_CONNECT: %w", err)
		}
		if err := unix.Connect(fd, sa); err != nil {
			return "", "", timedOut(err)
		}
		local, peer = names(fd)
		if _, err := unix.Write(fd, o.first); err != nil {
			return "", "", timedOut(err)
		}
		return local, peer, nil
	case MethodIOUring:
		err = ioUringConnect(fd, sa, o.timeout)
	default:
		return "", "", fmt.Errorf("unknown connect method %q", o.method)
	}
	if err != nil {
		return "", "", err
	}
	local, peer = names(fd)
	return local, peer, nil
}
