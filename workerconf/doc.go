// Package workerconf is what a worker process is told and reads before it
// serves: the Settings the pool hands it on its command line (the models,
// their placement, the size of its batch), their defaults and validation,
// and the files of the model directories those settings name (model.json,
// decoded strictly).
//
// Both processes import it: the gateway's pool and registry write settings
// and refuse a broken model directory before any worker tries it; the
// worker reads the same settings back and loads those directories. So it
// must stay free of the worker's machinery (ONNX Runtime, the generation
// loop) and of the gateway's; it imports nothing of h3infer's but the
// tokenize package, whose template names model.json may use.
package workerconf
