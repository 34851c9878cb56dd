// LoRA Workshop: a tooltip on the family badge of Lora cards (the badge itself is CSS).
(function() {
    function label(card) {
        var family = card.dataset.sortLwfamily;
        if (!family || card.title) return;
        var fit = card.dataset.sortLwfit;  // only for files that name no model family
        if (fit) {
            card.title = "No model family in its metadata or keys; " + fit;
            return;
        }
        card.title = card.dataset.sortLwcompat === "no" ?
            family + " LoRA: made for another model family than the loaded checkpoint" :
            family + " LoRA";
    }
    function update() {
        document.querySelectorAll(".extra-network-pane .card[data-sort-lwfamily]").forEach(label);
    }
    if (typeof onUiUpdate === "function") {
        onUiUpdate(update);
    }
})();

// LoRA Workshop tab: refresh the training job's and the tools' status every 2 s while they are on screen
// (clicks each section's own Refresh button, whose handler bypasses the queue).
(function() {
    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }
    setInterval(function() {
        if (document.hidden) return;
        var app = root();
        var tab = app.querySelector("#tab_lora_workshop");
        if (!tab || tab.offsetParent === null) return;  // another tab is shown
        ["#lora_workshop_poll", "#lora_workshop_tools_poll"].forEach(function(id) {
            var button = app.querySelector(id);
            if (button && button.offsetParent !== null) button.click();  // not in a closed accordion
        });
    }, 2000);
})();
