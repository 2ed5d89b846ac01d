package standin

import (
	"bytes"
	"io"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func TestFmtSockaddrKeepsTheFamilyVisible(t *testing.T) {
	v4 := &unix.SockaddrInet4{Port: 80, Addr: [4]byte{10, 77, 0, 1}}
	mapped := &unix.SockaddrInet6{Port: 15001, Addr: netip.MustParseAddr("::ffff:127.0.0.1").As16()}
	if got := fmtSockaddr(v4); got != "10.77.0.1:80" {
		t.Error(got)
	}
	if got := fmtSockaddr(mapped); got != "[::ffff:127.0.0.1]:15001" {
		t.Error(got)
	}
}

func TestIsSelfCall(t *testing.T) {
	for s, want := range map[string]bool{
		"127.0.0.1:15001":          true,
		"127.0.0.5:15006":          true,
		"[::ffff:127.0.0.1]:15008": true,
		"[::1]:15001":              true,
		"127.0.0.1:8080":           false,
		"10.77.0.2:15001":          false,
	} {
		if got := isSelfCall(PortOutbound, netip.MustParseAddrPort(s)); got != want {
			t.Errorf("outbound %s: %v", s, got)
		}
	}
	// The inbound listener refuses its own ports on any address: relaying
	// pod:15006 to pod:15006 would loop.
	for s, want := range map[string]bool{
		"127.0.0.1:15006": true,
		"10.77.0.2:15006": true,
		"10.77.0.2:15001": true,
		"10.77.0.2:15008": true,
		"10.77.0.2:8080":  false,
	} {
		if got := isSelfCall(PortInbound, netip.MustParseAddrPort(s)); got != want {
			t.Errorf("inbound %s: %v", s, got)
		}
	}
}

func TestPayloadCheck(t *testing.T) {
	var buf bytes.Buffer
	if _, err := io.CopyN(&buf, payloadStream("up/x"), 5000); err != nil {
		t.Fatal(err)
	}
	data := buf.Bytes()
	if _, ok, _ := checkPayload(bytes.NewReader(data), "up/x", 5000); !ok {
		t.Error("intact payload rejected")
	}
	data[4000] ^= 1
	if _, ok, _ := checkPayload(bytes.NewReader(data), "up/x", 5000); ok {
		t.Error("corrupt payload accepted")
	}
	if got, ok, _ := checkPayload(bytes.NewReader(data[:10]), "up/x", 5000); ok || got != 10 {
		t.Errorf("short payload: got=%d ok=%v", got, ok)
	}
}
