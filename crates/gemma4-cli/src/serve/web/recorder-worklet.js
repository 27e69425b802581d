// Microphone capture for the chat page: hands each block of mono samples to the page,
// which writes them out as a 16-bit WAV clip (a format the server decodes).
'use strict';

class Recorder extends AudioWorkletProcessor {
  process(inputs) {
    const input = inputs[0];
    if (input && input.length) {
      // Channels averaged into mono, as the server would do anyway.
      const n = input[0].length;
      const mono = new Float32Array(n);
      for (const ch of input) for (let i = 0; i < n; i++) mono[i] += ch[i] / input.length;
      this.port.postMessage(mono, [mono.buffer]);
    }
    return true;
  }
}

registerProcessor('gemma4-recorder', Recorder);
