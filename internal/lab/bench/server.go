package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
)

// The wire protocol between the generator and the servers. A connection starts with
// an 8-byte header: 'b', the mode, two zero bytes and a big-endian uint32 size.
//
//   - modeRR: the client sends requests of `size` bytes; the server answers each with
//     `size` bytes, until the client closes. A short connection is one exchange.
//   - modeBulk: the client streams until it half-closes; the server then answers the
//     8-byte big-endian count of the bytes it received and closes.
const (
	headerLen = 8
	modeRR    = 'r'
	modeBulk  = 'k'
	maxSize   = 1 << 20
	bufSize   = 64 << 10
)

// serveSpec starts a server.
type serveSpec struct {
	Addr string `json:"addr"` // ip:port, IPv4
}

func header(mode byte, size int) []byte {
	h := make([]byte, headerLen)
	h[0], h[1] = 'b', mode
	binary.BigEndian.PutUint32(h[4:], uint32(size))
	return h
}

func parseHeader(h []byte) (mode byte, size int, err error) {
	size = int(binary.BigEndian.Uint32(h[4:]))
	if h[0] != 'b' || (h[1] != modeRR && h[1] != modeBulk) || size > maxSize {
		return 0, 0, fmt.Errorf("bad header %x", h)
	}
	return h[1], size, nil
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

type server struct {
	ln       net.Listener
	log      *slog.Logger
	inFlight atomic.Int64
}

func startServer(addr string, log *slog.Logger) (*server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &server{ln: ln, log: log}
	go s.acceptLoop()
	return s, nil
}

func (s *server) Close() error { return s.ln.Close() }

func (s *server) acceptLoop() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // EMFILE and the like: keep serving
		}
		s.inFlight.Add(1)
		go func() {
			defer s.inFlight.Add(-1)
			defer c.Close()
			s.serve(c.(*net.TCPConn))
		}()
	}
}

func (s *server) serve(c *net.TCPConn) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	if _, err := io.ReadFull(c, buf[:headerLen]); err != nil {
		return
	}
	mode, size, err := parseHeader(buf[:headerLen])
	if err != nil {
		return
	}
	switch mode {
	case modeRR:
		if size > len(buf) {
			buf = make([]byte, size)
		}
		msg := buf[:size]
		for {
			if _, err := io.ReadFull(c, msg); err != nil {
				return // the client's close (EOF) ends the exchange
			}
			if _, err := c.Write(msg); err != nil {
				return
			}
		}
	case modeBulk:
		var n int64
		for {
			k, err := c.Read(buf)
			n += int64(k)
			if err != nil {
				break
			}
		}
		var out [8]byte
		binary.BigEndian.PutUint64(out[:], uint64(n))
		_, _ = c.Write(out[:])
	}
}
