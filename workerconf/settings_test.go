package workerconf

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

// fullSettings sets every field of Settings, and of a Model, to a value
// other than its zero.
func fullSettings() Settings {
	on, off := true, false
	return Settings{
		Models: []Model{{Name: "demo", Dir: "/m/demo/1"}, {Name: "b", Dir: "/m/b=2"},
			{Name: "g", Dir: "/m/g", Provider: ProviderCUDA, DeviceID: 1, DeviceKV: &off},
			{Name: "t", Dir: "/m/t", Provider: ProviderTensorRT}, {Name: "a", Dir: "/m/a", Provider: ProviderAuto, DeviceKV: &on},
			{Name: "s", Dir: "synthetic:2ms"}},
		GPUMemoryBytes:  20 << 30,
		ORTLib:          "/opt/ort/libonnxruntime.so.1",
		Slots:           7,
		KVCacheBytes:    3 << 30,
		IntraOpThreads:  2,
		StatsInterval:   250 * time.Millisecond,
		Nice:            new(7),
		CopyWeights:     true,
		WeightsCacheDir: "/var/cache/h3infer/weights",
	}
}

// The pool writes a worker's settings with Args and the worker reads them
// back with ParseArgs; every setting must survive the trip.
func TestSettingsRoundTrip(t *testing.T) {
	full := fullSettings()
	for _, v := range []reflect.Value{reflect.ValueOf(full), reflect.ValueOf(full.Models[2])} {
		for i := range v.NumField() {
			if v.Field(i).IsZero() {
				t.Fatalf("the full case leaves %s.%s zero; set it so the round trip covers it", v.Type().Name(), v.Type().Field(i).Name)
			}
		}
	}
	for name, s := range map[string]Settings{
		"full":     full,
		"defaults": {Models: []Model{{Name: "demo", Dir: "/d"}}, ORTLib: "/l.so"},
		"nice off": {Models: []Model{{Name: "demo", Dir: "/d"}}, Nice: new(0)},
	} {
		t.Run(name, func(t *testing.T) {
			args, err := s.Args()
			if err != nil {
				t.Fatal(err)
			}
			got, err := ParseArgs(args)
			if err != nil {
				t.Fatalf("ParseArgs(%q): %v", args, err)
			}
			if !reflect.DeepEqual(got, s) {
				t.Errorf("round trip through %q:\n got %+v\nwant %+v", args, got, s)
			}
		})
	}
}

func TestSettingsRejectBadInput(t *testing.T) {
	arg := func(json string) []string { return []string{"--settings=" + json} }
	for name, tc := range map[string]struct {
		args []string
		want string // what the error must say
	}{
		"no argument":       {nil, "--settings="},
		"flags of old":      {[]string{"--model=demo=/d", "--slots=2"}, "--settings="},
		"extra argument":    {append(arg(`{"models":[{"name":"demo","dir":"/d"}]}`), "extra"), "got 2 arguments"},
		"not JSON":          {arg(`models=demo`), "decode"},
		"unknown field":     {arg(`{"models":[{"name":"demo","dir":"/d"}],"slot":2}`), `unknown field "slot"`},
		"unknown model key": {arg(`{"models":[{"name":"demo","dir":"/d","gpu":1}]}`), `unknown field "gpu"`},
		"trailing data":     {arg(`{"models":[{"name":"demo","dir":"/d"}]} {}`), "trailing data"},
		"negative slots":    {arg(`{"models":[{"name":"demo","dir":"/d"}],"slots":-1}`), "workers.slots: must be 1..1024, or 0 to derive them from the KV budget, got -1"},
		"too many slots":    {arg(`{"models":[{"name":"demo","dir":"/d"}],"slots":1025}`), "workers.slots"},
		"small KV budget":   {arg(`{"models":[{"name":"demo","dir":"/d"}],"kv_cache_bytes":5}`), "workers.kv_cache_bytes"},
		"threads":           {arg(`{"models":[{"name":"demo","dir":"/d"}],"intra_op_threads":-1}`), "workers.intra_op_threads"},
		"gpu memory":        {arg(`{"models":[{"name":"demo","dir":"/d"}],"gpu_memory_bytes":-1}`), "workers.gpu_memory_bytes"},
		"nice":              {arg(`{"models":[{"name":"demo","dir":"/d"}],"nice":20}`), "workers.nice"},
		"stats interval":    {arg(`{"models":[{"name":"demo","dir":"/d"}],"stats_interval":-1}`), "stats_interval"},
		"model without dir": {arg(`{"models":[{"name":"demo"}]}`), "models[0].dir"},
		"model twice":       {arg(`{"models":[{"name":"demo","dir":"/d"},{"name":"demo","dir":"/e"}]}`), "models[1].name"},
		"provider":          {arg(`{"models":[{"name":"demo","dir":"/d","provider":"rocm"}]}`), "models[0].provider"},
		"device":            {arg(`{"models":[{"name":"demo","dir":"/d","provider":"cuda","device_id":-1}]}`), "models[0].device_id"},
		"device on cpu":     {arg(`{"models":[{"name":"demo","dir":"/d","device_id":1}]}`), "models[0].device_id"},
		"device_kv":         {arg(`{"models":[{"name":"demo","dir":"/d","device_kv":"maybe"}]}`), "device_kv"},
		"bad synthetic":     {arg(`{"models":[{"name":"demo","dir":"synthetic:soon"}]}`), "models[0].dir"},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseArgs(tc.args)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ParseArgs(%q) = %v, want an error saying %q", tc.args, err, tc.want)
			}
		})
	}
}

// Every problem is reported at once.
func TestSettingsValidateReportsAll(t *testing.T) {
	err := Settings{Slots: -1, Nice: new(-1), Models: []Model{{Name: "a"}}}.Validate()
	for _, key := range []string{"workers.slots:", "workers.nice:", "models[0].dir:"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("error %v does not name %s", err, key)
		}
	}
}

func TestGPUShare(t *testing.T) {
	s := Settings{GPUMemoryBytes: 12 << 30, Models: []Model{
		{Name: "a", Provider: ProviderCUDA}, {Name: "b", Provider: ProviderAuto}, {Name: "c", Provider: ProviderCUDA, DeviceID: 1}, {Name: "d"}}}
	for i, want := range []int64{6 << 30, 6 << 30, 12 << 30, 0} {
		if got := s.GPUShare(s.Models[i]); got != want {
			t.Errorf("share of %s: got %d, want %d", s.Models[i].Name, got, want)
		}
	}
}

func FuzzParseArgs(f *testing.F) {
	args, err := fullSettings().Args()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(args[0])
	f.Add(`--settings={"models":[{"name":"demo","dir":"synthetic"}],"nice":0}`)
	f.Add(`--settings={"models":null}`)
	f.Fuzz(func(t *testing.T, arg string) {
		s, err := ParseArgs([]string{arg})
		if err != nil {
			return
		}
		// What was accepted is valid and survives another trip.
		if err := s.Validate(); err != nil {
			t.Fatalf("accepted invalid settings %+v: %v", s, err)
		}
		again, err := s.Args()
		if err != nil {
			t.Fatal(err)
		}
		s2, err := ParseArgs(again)
		if err != nil || !reflect.DeepEqual(s, s2) {
			t.Fatalf("%q read back as %+v, %v; want %+v", again, s2, err, s)
		}
	})
}

// Derived slots are the full-context sequences the KV budget holds, never
// fewer than the old fixed default and never more than the ceiling.
func TestAutoSlots(t *testing.T) {
	const seq = 8 << 20 // the demo model's full context, both buffers
	for name, tc := range map[string]struct {
		budget, perSeq int64
		slots, fit     int
	}{
		"default budget, demo model": {1 << 30, seq, MaxAutoSlots, 128},
		"in range":                   {20*seq + seq/2, seq, 20, 20},
		"exactly the floor":          {MinAutoSlots * seq, seq, MinAutoSlots, MinAutoSlots},
		"one fits":                   {seq + 1, seq, MinAutoSlots, 1},
		"none fits":                  {seq - 1, seq, MinAutoSlots, 0},
		"no cache":                   {1 << 30, 0, MaxAutoSlots, MaxSlots},
		"fit bounded by MaxSlots":    {1 << 40, 1, MaxAutoSlots, MaxSlots},
	} {
		t.Run(name, func(t *testing.T) {
			slots, fit := AutoSlots(tc.budget, tc.perSeq)
			if slots != tc.slots || fit != tc.fit {
				t.Errorf("AutoSlots(%d, %d) = %d, %d; want %d, %d", tc.budget, tc.perSeq, slots, fit, tc.slots, tc.fit)
			}
		})
	}
}

// Slots 0 asks the worker to derive them, so WithDefaults leaves it and
// Validate takes it; a negative count is refused, naming the key.
func TestSlotsZeroIsAuto(t *testing.T) {
	s := Settings{Models: []Model{{Name: "demo", Dir: "/d"}}}
	if got := s.WithDefaults().Slots; got != 0 {
		t.Errorf("WithDefaults().Slots = %d, want 0 (derived by the worker)", got)
	}
	if err := s.Validate(); err != nil {
		t.Errorf("slots 0: %v", err)
	}
	s.Slots = -1
	if err := s.Validate(); err == nil || !strings.Contains(err.Error(), "workers.slots:") {
		t.Errorf("slots -1: got %v, want an error naming workers.slots", err)
	}
}
