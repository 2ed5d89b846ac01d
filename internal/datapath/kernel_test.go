package datapath

import (
	"strings"
	"testing"
)

func TestCheckRelease(t *testing.T) {
	for rel, ok := range map[string]bool{
		"6.18.44-fc-v595": true, "6.3.0": true, "7.0": true, "6.6.12-generic": true,
		"6.2.16": false, "5.15.0-91-generic": false, "4.19": false, "garbage": false, "6.x": false,
	} {
		err := checkRelease(rel)
		if (err == nil) != ok {
			t.Errorf("checkRelease(%q) = %v, want ok=%v", rel, err, ok)
		}
		if err != nil && !strings.Contains(err.Error(), rel) {
			t.Errorf("error does not name the release: %v", err)
		}
	}
}
