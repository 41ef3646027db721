// retok-llama: greedy decoding through llama.cpp's C API, printing token ids and timings as one JSON line.
//
//   retok-llama -m model.gguf -f prompt.txt -n 32 [-t threads] [-c ctx]      greedy: n new tokens
//   retok-llama -m model.gguf -f prompt.txt -r continuation.txt [-t threads]  timed: feed a reference text
//   retok-llama -m model.gguf -f texts.txt --tokenize    ids of each NUL-separated text (vocabulary only)
//   retok-llama -m model.gguf -f text.txt --perplexity N_CTX [-t threads]   llama-perplexity's estimate
//
// --perplexity scores the text as llama-perplexity does (the text tokenized with BOS where the GGUF adds it,
// cut into chunks of N_CTX tokens, BOS in place of each chunk's first token, the tokens after the first half
// of each chunk scored) and prints {"ppl": ..., "nll": nats, "count": scored tokens, "chunks": n} from this
// process's own stdout: llama-perplexity's logger thread can lose its last lines when a busy machine ends the
// process first, this cannot.
// llama.cpp's own tokenizer encodes the prompt (BOS as the GGUF's add_bos flag says, special tokens not
// parsed). Greedy: exactly n tokens are chosen by argmax of the logits (end-of-generation tokens do not stop
// it, so two runs always decode the same number of tokens). With -r, the reference continuation's tokens are
// fed one decode call each instead (the argmax is still computed, as in real decoding), so two models decode
// the same BYTES and their times compare as bytes/s. Output:
//   {"prompt_ids": [...], "ids": [...], "prompt_s": s, "decode_s": s, "decode_calls": n - 1}
// decode_s covers the n - 1 single-token decode calls after the prompt (the first new token comes from the
// prompt's logits): decode_calls / decode_s is the decoding speed in tokens per second.
#include "llama.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static double now_s() {
    using namespace std::chrono;
    return duration<double>(steady_clock::now().time_since_epoch()).count();
}

static void quiet_log(enum ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    std::string model_path, prompt_path, ref_path;
    int n_predict = 32, n_threads = 2, n_ctx = 0;
    bool tokenize_only = false;
    int ppl_ctx = 0;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto next = [&]() -> const char * {
            if (i + 1 >= argc) { fprintf(stderr, "retok-llama: %s needs a value\n", a.c_str()); exit(2); }
            return argv[++i];
        };
        if (a == "-m") model_path = next();
        else if (a == "-f") prompt_path = next();
        else if (a == "-r") ref_path = next();
        else if (a == "-n") n_predict = atoi(next());
        else if (a == "-t") n_threads = atoi(next());
        else if (a == "-c") n_ctx = atoi(next());
        else if (a == "--tokenize") tokenize_only = true;
        else if (a == "--perplexity") ppl_ctx = atoi(next());
        else { fprintf(stderr, "retok-llama: unknown argument %s\n", a.c_str()); return 2; }
    }
    if (model_path.empty() || prompt_path.empty()) {
        fprintf(stderr, "usage: retok-llama -m model.gguf -f prompt.txt [-n 32] [-t 2] [-c ctx]\n");
        return 2;
    }
    auto slurp = [](const std::string & path, std::string & out) {
        std::ifstream in(path, std::ios::binary);
        if (!in) { fprintf(stderr, "retok-llama: cannot read %s\n", path.c_str()); exit(2); }
        std::stringstream ss; ss << in.rdbuf();
        out = ss.str();
    };
    std::string prompt, ref;
    slurp(prompt_path, prompt);
    if (!ref_path.empty()) slurp(ref_path, ref);

    llama_log_set(quiet_log, nullptr);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = tokenize_only;
    llama_model * model = llama_model_load_from_file(model_path.c_str(), mp);
    if (!model) { fprintf(stderr, "retok-llama: cannot load %s\n", model_path.c_str()); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);

    if (tokenize_only) {  // one process for many texts: no BOS, special tokens not parsed
        printf("{\"tokens\": [");
        size_t start = 0;
        for (int k = 0; start <= prompt.size(); k++) {
            size_t end = prompt.find('\0', start);
            if (end == std::string::npos) end = prompt.size();
            const char * text = prompt.data() + start;
            const int len = (int) (end - start);
            int n = -llama_tokenize(vocab, text, len, nullptr, 0, false, false);
            std::vector<llama_token> ids(n > 0 ? n : 0);
            if (n > 0) llama_tokenize(vocab, text, len, ids.data(), n, false, false);
            printf("%s[", k ? ", " : "");
            for (int i = 0; i < n; i++) printf("%s%d", i ? ", " : "", ids[i]);
            printf("]");
            start = end + 1;
        }
        printf("]}\n");
        llama_model_free(model);
        return 0;
    }

    const bool add_bos = llama_vocab_get_add_bos(vocab);
    if (ppl_ctx > 0) {
        int n_tok = -llama_tokenize(vocab, prompt.data(), prompt.size(), nullptr, 0, add_bos, false);
        std::vector<llama_token> all(n_tok);
        llama_tokenize(vocab, prompt.data(), prompt.size(), all.data(), n_tok, add_bos, false);
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = ppl_ctx;
        cp.n_batch = ppl_ctx;
        cp.n_ubatch = ppl_ctx;
        cp.n_threads = n_threads;
        cp.n_threads_batch = n_threads;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) { fprintf(stderr, "retok-llama: cannot create a context\n"); return 1; }
        const int n_vocab = llama_vocab_n_tokens(vocab);
        const int n_chunks = n_tok / ppl_ctx, first = ppl_ctx / 2;
        llama_batch batch = llama_batch_init(ppl_ctx, 0, 1);
        double nll = 0.0;
        long count = 0;
        for (int c = 0; c < n_chunks; c++) {
            llama_memory_clear(llama_get_memory(ctx), true);
            batch.n_tokens = ppl_ctx;
            for (int i = 0; i < ppl_ctx; i++) {
                llama_token t = all[c * ppl_ctx + i];
                if (i == 0 && add_bos) t = llama_vocab_bos(vocab);
                batch.token[i] = t;
                batch.pos[i] = i;
                batch.n_seq_id[i] = 1;
                batch.seq_id[i][0] = 0;
                batch.logits[i] = 1;
            }
            if (llama_decode(ctx, batch)) { fprintf(stderr, "retok-llama: decode failed\n"); return 1; }
            for (int i = first; i < ppl_ctx - 1; i++) {
                const float * lg = llama_get_logits_ith(ctx, i);
                double mx = lg[0];
                for (int j = 1; j < n_vocab; j++) if (lg[j] > mx) mx = lg[j];
                double sum = 0.0;
                for (int j = 0; j < n_vocab; j++) sum += exp((double) lg[j] - mx);
                nll -= (double) lg[all[c * ppl_ctx + i + 1]] - mx - log(sum);
                count++;
            }
        }
        printf("{\"ppl\": %.8f, \"nll\": %.8f, \"count\": %ld, \"chunks\": %d}\n",
               count ? exp(nll / count) : 0.0, nll, count, n_chunks);
        llama_batch_free(batch);
        llama_free(ctx);
        llama_model_free(model);
        llama_backend_free();
        return 0;
    }
    int n_prompt = -llama_tokenize(vocab, prompt.data(), prompt.size(), nullptr, 0, add_bos, false);
    std::vector<llama_token> toks(n_prompt);
    if (llama_tokenize(vocab, prompt.data(), prompt.size(), toks.data(), n_prompt, add_bos, false) < 0) {
        fprintf(stderr, "retok-llama: tokenization failed\n"); return 1;
    }

    std::vector<llama_token> ref_toks;
    if (!ref_path.empty()) {
        int n_ref = -llama_tokenize(vocab, ref.data(), ref.size(), nullptr, 0, false, false);
        ref_toks.resize(n_ref);
        llama_tokenize(vocab, ref.data(), ref.size(), ref_toks.data(), n_ref, false, false);
        n_predict = n_ref + 1;  // the prompt's logits give the first token; each reference token is one call
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx > 0 ? n_ctx : n_prompt + n_predict + 8;
    cp.n_batch = n_prompt > 0 ? n_prompt : 1;
    cp.n_ubatch = cp.n_batch;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "retok-llama: cannot create a context\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(vocab);

    auto argmax = [&]() {
        const float * logits = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int j = 1; j < n_vocab; j++) if (logits[j] > logits[best]) best = j;
        return best;
    };

    double t0 = now_s();
    if (llama_decode(ctx, llama_batch_get_one(toks.data(), n_prompt))) {
        fprintf(stderr, "retok-llama: prompt decode failed\n"); return 1;
    }
    double t1 = now_s();
    std::vector<llama_token> out;
    llama_token cur = argmax();
    for (int k = 0; k < n_predict; k++) {
        out.push_back(cur);
        if (k + 1 == n_predict) break;
        if (!ref_toks.empty()) cur = ref_toks[k];
        if (llama_decode(ctx, llama_batch_get_one(&cur, 1))) {
            fprintf(stderr, "retok-llama: decode failed\n"); return 1;
        }
        cur = argmax();
    }
    double t2 = now_s();

    printf("{\"prompt_ids\": [");
    for (int i = 0; i < n_prompt; i++) printf("%s%d", i ? ", " : "", toks[i]);
    printf("], \"ids\": [");
    for (size_t i = 0; i < out.size(); i++) printf("%s%d", i ? ", " : "", out[i]);
    printf("], \"prompt_s\": %.6f, \"decode_s\": %.6f, \"decode_calls\": %d}\n", t1 - t0, t2 - t1,
           n_predict > 0 ? n_predict - 1 : 0);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
