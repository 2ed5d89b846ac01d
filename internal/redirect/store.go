package redirect

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/config"
	"github.com/ebpf-redirect/ebpf-redirect/internal/datapath"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// DefaultRoot is where pins live unless told otherwise.
const DefaultRoot = "/sys/fs/bpf/ebpf-redirect"

// Layout under the root (all on bpffs):
//
//	dp/                    the shared programs and maps (datapath.Pin)
//	pod_meta               map: pod id -> JSON record of what was attached
//	pod_owners             map: netns cookie / cgroup id -> pod id, proxy refcounts
//	pods/<id>/<hook>       the pod's links
//	proxy/<cgroup id>/     the links at the proxy's cgroup, shared by its pods
const (
	dpDir      = "dp"
	metaPin    = "pod_meta"
	ownersPin  = "pod_owners"
	podsDir    = "pods"
	proxiesDir = "proxy"

	maxPodID    = 63
	metaKeySize = 64
	metaValSize = 4096
)

var podIDRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// ValidatePodID accepts ids that are safe as one path component.
func ValidatePodID(id string) error {
	switch {
	case id == "":
		return errors.New("pod id is empty")
	case len(id) > maxPodID:
		return fmt.Errorf("pod id is %d bytes, at most %d allowed", len(id), maxPodID)
	case !podIDRe.MatchString(id):
		return fmt.Errorf("pod id %q: only letters, digits, '.', '_' and '-' are allowed, starting with a letter or digit (no '/', '..', spaces or NUL)", id)
	}
	return nil
}

// Record is what was attached for one pod, kept in the pod_meta map so that
// a later process (detach, list) knows what to undo.
type Record struct {
	ID            string             `json:"id"`
	State         string             `json:"state"` // "attaching" until every step is done
	Netns         string             `json:"netns"`
	Cgroup        string             `json:"cgroup"`
	ProxyCgroup   string             `json:"proxy_cgroup,omitempty"`
	NetnsCookie   uint64             `json:"netns_cookie"`
	CgroupID      uint64             `json:"cgroup_id"`
	ProxyCgroupID uint64             `json:"proxy_cgroup_id,omitempty"`
	PodIP         string             `json:"pod_ip,omitempty"`
	PodIP6        string             `json:"pod_ip6,omitempty"`
	PodLL6        string             `json:"pod_ll6,omitempty"` // with PodLLIndex its scope
	PodLLIndex    int                `json:"pod_ll_index,omitempty"`
	Ifaces        []Iface            `json:"ifaces"`
	Local         []string           `json:"local_addrs"`
	Route         podnet.PolicyRoute `json:"route"`
	RuleCreated   bool               `json:"rule_created"`
	RouteCreated  bool               `json:"route_created"`
	Rule6Created  bool               `json:"rule6_created,omitempty"`
	Route6Created bool               `json:"route6_created,omitempty"`
	// Sysctls are the values of the sysctls attach set, before it did.
	Sysctls      map[string]string `json:"sysctls_before,omitempty"`
	ProxyCounted bool              `json:"proxy_counted,omitempty"`
	TC           []TCAttachment    `json:"tc"`
	AttachedAt   time.Time         `json:"attached_at"`
}

// Iface is an interface the tc programs are attached to, and the addresses
// REDIRECT sends its inbound connections to.
type Iface struct {
	Index    int    `json:"index"`
	Name     string `json:"name"`
	Primary  string `json:"primary,omitempty"`
	Primary6 string `json:"primary6,omitempty"`
	LL6      string `json:"ll6,omitempty"`
}

const (
	stateAttaching = "attaching"
	stateAttached  = "attached"
)

// store is the pinned state under one root, held under an exclusive lock.
type store struct {
	root   string
	lock   *os.File
	meta   *ebpf.Map
	owners *ebpf.Map
	dp     *datapath.Datapath
}

// openStore checks the root is on bpffs (mounting one at /sys/fs/bpf first
// if o.MountBPFFS says so), takes the lock, refuses pins of another schema
// (unless anySchema: upgrade), and opens (or creates) the metadata maps. The
// datapath is opened separately, on demand.
func openStore(o Options, anySchema bool) (*store, error) {
	root := o.Root
	if root == "" {
		root = DefaultRoot
	}
	if o.MountBPFFS && root == DefaultRoot {
		if err := ensureBPFFS(filepath.Dir(DefaultRoot), o.log()); err != nil {
			return nil, err
		}
	}
	// The root itself, or (before its first use) its parent, must be on bpffs.
	on := root
	if _, err := os.Stat(root); err != nil {
		on = filepath.Dir(root)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(on, &fs); err != nil {
		return nil, fmt.Errorf("bpffs: %s: %w (is bpffs mounted? mount -t bpf bpf %s)", on, err, on)
	}
	if fs.Type != unix.BPF_FS_MAGIC {
		return nil, fmt.Errorf("bpffs: %s is not on a bpf filesystem; mount one (mount -t bpf bpf %s) or pass --bpffs DIR on one", on, on)
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, fmt.Errorf("bpffs: creating %s: %w", root, err)
	}
	lock, err := os.Open(root)
	if err != nil {
		return nil, err
	}
	// One writer at a time: two processes attaching or detaching at once
	// would otherwise race on pins and map entries.
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
		lock.Close()
		return nil, fmt.Errorf("locking %s: %w", root, err)
	}
	s := &store{root: root, lock: lock}
	if !anySchema {
		if err := s.checkSchema(o); err != nil {
			s.Close()
			return nil, err
		}
	}
	if s.meta, err = openOrCreateMap(filepath.Join(root, metaPin), "erd_pod_meta", metaKeySize, metaValSize); err != nil {
		s.Close()
		return nil, err
	}
	if s.owners, err = openOrCreateMap(filepath.Join(root, ownersPin), "erd_pod_owners", ownerKeySize, metaKeySize); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// checkSchema refuses a store pinned by another schema than this binary's,
// before anything in it is read or written.
func (s *store) checkSchema(o Options) error {
	return datapath.CheckSchema(filepath.Join(s.root, dpDir), o.Datapath)
}

// ensureBPFFS mounts a bpffs on dir unless one is mounted there.
func ensureBPFFS(dir string, log *slog.Logger) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err == nil && fs.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("bpffs: creating %s: %w", dir, err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("bpffs: no bpffs at %s and mounting one failed: %w", dir, err)
	}
	log.Info("mounted a bpffs (none was mounted)", "at", dir)
	return nil
}

// Check opens the store under the root (bpffs check, lock, metadata maps)
// and releases it: a cheap test that the root is usable, whatever is pinned.
func Check(o Options) error {
	s, err := openStore(o, true)
	if err != nil {
		return err
	}
	s.Close()
	return nil
}

func openOrCreateMap(path, name string, keySize, valueSize uint32) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil {
		return m, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	m, err = ebpf.NewMap(&ebpf.MapSpec{
		Name:       name,
		Type:       ebpf.Hash,
		KeySize:    keySize,
		ValueSize:  valueSize,
		MaxEntries: 65536,
		Flags:      unix.BPF_F_NO_PREALLOC,
	})
	if err != nil {
		return nil, fmt.Errorf("creating map %s: %w", name, err)
	}
	if err := m.Pin(path); err != nil {
		m.Close()
		return nil, fmt.Errorf("pinning %s: %w", path, err)
	}
	return m, nil
}

// datapath opens the pinned programs, loading and pinning them the first time.
// With cfg nil it only opens what is pinned, whatever its config (and returns
// an error wrapping os.ErrNotExist if nothing is). Pinned programs of another
// version than this binary's are used as they are: `upgrade` swaps them.
func (s *store) datapath(cfg *config.Config, o Options) (*datapath.Datapath, error) {
	if s.dp != nil {
		return s.dp, nil
	}
	dir := filepath.Join(s.root, dpDir)
	if _, statErr := os.Stat(dir); statErr == nil {
		dp, err := datapath.Open(dir, cfg, o.Datapath)
		if err != nil {
			return nil, err
		}
		if v := dp.PinnedVersion(); cfg != nil && v != datapath.Version() {
			o.log().Info("the pinned programs are of another version than this binary's; `ebpf-redirect upgrade` swaps this binary's in", "pinned", v, "binary", datapath.Version())
		}
		s.dp = dp
		return dp, nil
	}
	if cfg == nil {
		return nil, fmt.Errorf("no datapath pinned in %s: %w", dir, os.ErrNotExist)
	}
	dp, err := datapath.Load(*cfg, o.Datapath)
	if err != nil {
		return nil, err
	}
	if err := dp.Pin(dir); err != nil {
		dp.Close()
		return nil, err
	}
	s.dp = dp
	return dp, nil
}

func metaKey(id string) []byte {
	k := make([]byte, metaKeySize)
	copy(k, id)
	return k
}

func (s *store) get(id string) (*Record, error) {
	v := make([]byte, metaValSize)
	if err := s.meta.Lookup(metaKey(id), &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		return nil, err
	}
	return decodeRecord(v)
}

func decodeRecord(v []byte) (*Record, error) {
	if i := indexZero(v); i >= 0 {
		v = v[:i]
	}
	var r Record
	if err := json.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("corrupt pod record: %w", err)
	}
	return &r, nil
}

func indexZero(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

func (s *store) put(r *Record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if len(b) >= metaValSize {
		return fmt.Errorf("pod %s: record of %d bytes exceeds %d (too many interfaces or addresses)", r.ID, len(b), metaValSize)
	}
	v := make([]byte, metaValSize)
	copy(v, b)
	return s.meta.Put(metaKey(r.ID), v)
}

func (s *store) del(id string) error {
	err := s.meta.Delete(metaKey(id))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

func (s *store) all() ([]*Record, error) {
	var out []*Record
	k := make([]byte, metaKeySize)
	v := make([]byte, metaValSize)
	it := s.meta.Iterate()
	for it.Next(&k, &v) {
		r, err := decodeRecord(v)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, it.Err()
}

// podDir is where the pod's links are pinned. bpffs rejects names containing
// a dot, so dots in the id become '~' (which ids cannot contain).
// Owner kinds: which pod holds a netns or a cgroup, and how many pods share a
// proxy cgroup's link. An index, so that attach and detach cost the same at
// the 1000th pod as at the 2nd (no scan of every record).
const (
	ownerNetns uint64 = iota + 1
	ownerCgroup
	ownerProxy
	ownerKeySize = 16
)

func ownerKey(kind, id uint64) []byte {
	k := make([]byte, ownerKeySize)
	binary.NativeEndian.PutUint64(k, kind)
	binary.NativeEndian.PutUint64(k[8:], id)
	return k
}

// owner returns the pod id holding (kind, id), or "".
func (s *store) owner(kind, id uint64) (string, error) {
	v := make([]byte, metaKeySize)
	err := s.owners.Lookup(ownerKey(kind, id), &v)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if i := indexZero(v); i >= 0 {
		v = v[:i]
	}
	return string(v), nil
}

func (s *store) setOwner(kind, id uint64, pod string) error {
	return s.owners.Put(ownerKey(kind, id), metaKey(pod))
}

// dropOwner removes (kind, id) if pod holds it.
func (s *store) dropOwner(kind, id uint64, pod string) error {
	cur, err := s.owner(kind, id)
	if err != nil || cur != pod {
		return err
	}
	err = s.owners.Delete(ownerKey(kind, id))
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	}
	return err
}

// proxyRefs adds delta to the number of pods using a proxy cgroup's link and
// returns the new count.
func (s *store) proxyRefs(cgroupID uint64, delta int64) (int64, error) {
	k := ownerKey(ownerProxy, cgroupID)
	v := make([]byte, metaKeySize)
	var n int64
	if err := s.owners.Lookup(k, &v); err == nil {
		n = int64(binary.NativeEndian.Uint64(v))
	} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, err
	}
	n += delta
	if n <= 0 {
		if err := s.owners.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, err
		}
		return 0, nil
	}
	v = make([]byte, metaKeySize)
	binary.NativeEndian.PutUint64(v, uint64(n))
	return n, s.owners.Put(k, v)
}

// empty reports whether no pod is recorded (without reading every record).
func (s *store) empty() (bool, error) {
	k := make([]byte, metaKeySize)
	err := s.meta.NextKey(nil, &k)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return true, nil
	}
	return false, err
}

func (s *store) podDir(id string) string {
	return filepath.Join(s.root, podsDir, strings.ReplaceAll(id, ".", "~"))
}

// proxyDir is where the links at a proxy's cgroup are pinned.
func (s *store) proxyDir(cgroupID uint64) string {
	return filepath.Join(s.root, proxiesDir, fmt.Sprint(cgroupID))
}

// Close releases handles and the lock; pins stay.
func (s *store) Close() {
	if s.dp != nil {
		s.dp.Close()
	}
	if s.meta != nil {
		s.meta.Close()
	}
	if s.owners != nil {
		s.owners.Close()
	}
	if s.lock != nil {
		s.lock.Close() // drops the flock
	}
}

// pruneIfEmpty removes the shared programs and maps once no pod uses them, so
// that detaching the last pod leaves nothing of ours in the kernel.
func (s *store) pruneIfEmpty(log *slog.Logger) error {
	if empty, err := s.empty(); err != nil || !empty {
		return err
	}
	if s.dp != nil {
		s.dp.Close()
		s.dp = nil
	}
	var errs []error
	for _, dir := range []string{filepath.Join(s.root, dpDir), filepath.Join(s.root, proxiesDir), filepath.Join(s.root, podsDir)} {
		if dir == filepath.Join(s.root, proxiesDir) {
			subs, _ := os.ReadDir(dir)
			for _, sub := range subs {
				errs = append(errs, removeLinks(filepath.Join(dir, sub.Name())))
			}
		}
		// Programs and maps are released when their last pin goes.
		errs = append(errs, os.RemoveAll(dir))
	}
	errs = append(errs, os.Remove(filepath.Join(s.root, metaPin)), os.Remove(filepath.Join(s.root, ownersPin)))
	log.Info("no pods left; unloaded the datapath", "root", s.root)
	return errors.Join(errs...)
}
